"""Memory-safe batch sizes (:mod:`SegXAILib.models.memory`): the batch arithmetic, the saved-tensor
measurement against a hand count, an explicit batch that cannot fit refused with the estimate,
the automatic batch equal to the same explicit one, a run under an address-space cap
(``RLIMIT_AS``) that finishes with the default and is refused (exit 2, not killed) with a batch
that cannot fit, an out-of-memory error inside a step turned into exit 2 with a message, and the
time limit: a computation estimated over it refused before its first batch (library and
``segxai explain``), and the same computation confirmed giving the map it gives with no limit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from SegXAILib.image import SegXAIInputError
from SegXAILib.models import memory
from SegXAILib.models.memory import fit_batch, measure_pass, saved_tensor_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[1]


# ---- fit_batch: known values ---------------------------------------------------------------------
def test_fit_batch_known_values():
    # budget 0.8 * 10 GiB = 8 GiB, 1 GiB per item: 8 fit
    assert fit_batch(0, GIB, 10 * GIB, cap=4) == 4  # auto: at most the cap
    assert fit_batch(0, GIB, 10 * GIB, cap=16) == 8  # auto: all that fit
    assert fit_batch(0, GIB, 10 * GIB, cap=16, limit=3) == 3  # never more than the items
    assert fit_batch(0, GIB, 10 * GIB, cap=16, fixed_bytes=2 * GIB) == 6  # (8 - 2) / 1
    assert fit_batch(8, GIB, 10 * GIB) == 8  # explicit, fits exactly
    assert fit_batch(100, GIB, 10 * GIB, limit=5) == 100  # only 5 items: a batch of 5 is what runs
    assert fit_batch(0, 3 * GIB, 10 * GIB, safety=0.5) == 1  # 5 GiB budget


def test_explicit_batch_that_cannot_fit_is_refused_with_the_estimate():
    with pytest.raises(SegXAIInputError) as refused:
        fit_batch(16, 1.5 * GIB, 10 * GIB, device="cpu")
    message = str(refused.value)
    # 16 x 1.5 GiB = 24 GiB needed; 8 GiB usable: 5 fit
    assert message.startswith("batch_size 16 needs about 24.0 GB; 10.0 GB available on cpu")
    assert "use 5 or fewer" in message
    with pytest.raises(SegXAIInputError, match=r"samples: even a batch of 1 needs about 9\.0 GB"):
        fit_batch(0, 9 * GIB, 10 * GIB, name="samples")
    with pytest.raises(SegXAIInputError, match="batch_size must be >= 1"):
        fit_batch(-1, GIB, 10 * GIB)


# ---- the measurement -----------------------------------------------------------------------------
def test_saved_tensor_bytes_of_a_tiny_conv_net_equal_a_hand_count():
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv3d(2, 1, 3, padding=1))
    x = torch.zeros(1, 1, 8, 8, 8, requires_grad=True)
    output, total, largest = saved_tensor_bytes(network, x, exclude=list(network.parameters()))
    # saved: conv 1's input x (1 x 8^3 float32), the ReLU's output, which conv 2 saves again as
    # its input (the same storage, counted once: 2 x 8^3 float32); the weights are excluded
    assert total == 4 * 8**3 * (1 + 2)
    assert largest == 4 * 8**3 * 2
    assert output.shape == (1, 1, 8, 8, 8)
    # the weights counted too when not excluded: 2*1*27 + 2 and 1*2*27 + 1 floats (biases are not saved)
    _, with_weights, _ = saved_tensor_bytes(network, x)
    assert with_weights == total + 4 * (2 * 27 + 2 * 27)
    # the pass on the CPU: saved + output + input gradient + twice the largest saved tensor
    cost = measure_pass(network, x)
    assert cost.bytes == total + 4 * 8**3 + 4 * 8**3 + 2 * largest
    assert cost.seconds > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pass_peak_holds_at_least_the_saved_tensors():
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv3d(2, 1, 3, padding=1)).cuda()
    x = torch.zeros(1, 1, 32, 32, 32, device="cuda")
    cost = measure_pass(network, x)
    # the allocator's peak holds at least the saved input and ReLU output and the input's gradient
    assert cost.bytes >= 4 * 32**3 * (1 + 2 + 1)
    free, total = torch.cuda.mem_get_info()
    assert 0 < memory.available_memory("cuda") <= total


def test_available_memory_is_positive_and_at_most_the_machine():
    available = memory.available_memory("cpu")
    assert 0 < available
    try:
        import psutil

        assert available <= psutil.virtual_memory().total
    except ImportError:
        pass


# ---- the methods ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forward_and_input():
    from conftest import make_forward, tiny_unet
    from SegXAILib.attribution import ClassTarget

    shape = (12, 16, 10)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[3:9, 5:11, 2:7] = True
    forward = make_forward(tiny_unet(), shape, ClassTarget(1, mask), patch=(16, 16, 16))
    x = torch.randn((1, 1, *shape), generator=torch.Generator().manual_seed(1))
    return forward, x


def test_auto_batch_is_the_largest_that_fits_and_gives_the_same_map(forward_and_input, monkeypatch):
    from SegXAILib.attribution.gradient import SmoothGrad

    forward, x = forward_and_input
    per_sample = forward.gradient_cost(x).per_sample_bytes
    assert per_sample > 4 * int(np.prod(x.shape))  # at least the input and its gradient
    # memory for 3.5 samples after the margin: auto chooses 3, an explicit 4 is refused
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": int(3.5 * per_sample / memory.SAFETY))
    seen = []
    auto = SmoothGrad(forward).attribute(x, n_samples=7, seed=5, progress=lambda f, m="": seen.append(m))
    assert any("batch 3, about" in m for m in seen), seen  # the estimate is said before the work
    explicit = SmoothGrad(forward).attribute(x, n_samples=7, seed=5, batch_size=3)
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)  # same chunks, same numbers
    with pytest.raises(SegXAIInputError, match=r"^batch_size 4 needs about .*use 3 or fewer"):
        SmoothGrad(forward).attribute(x, n_samples=7, batch_size=4)
    # an explicit batch above the sample count is checked as the samples it holds
    SmoothGrad(forward).attribute(x, n_samples=3, batch_size=50)


def test_batch_size_parameters_default_to_auto():
    from SegXAILib.attribution import get_method, parse_params

    for method in ("smoothgrad", "integrated_gradients", "expected_gradients", "guided_backprop", "guided_gradcam"):
        parameter = {p.name: p for p in get_method(method).parameters}["batch_size"]
        assert parameter.default == 0
    assert parse_params("smoothgrad", ["batch_size=auto"]) == {"batch_size": 0}
    assert parse_params("smoothgrad", ["batch_size=3"]) == {"batch_size": 3}
    with pytest.raises(SegXAIInputError):
        parse_params("smoothgrad", ["batch_size=-1"])


def test_guided_per_voxel_refuses_a_batch_that_cannot_fit(forward_and_input, monkeypatch):
    from SegXAILib.attribution.guided import GuidedBackprop

    forward, x = forward_and_input
    graph = forward.gradient_cost(x).graph_bytes
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": int(2.5 * graph / memory.SAFETY))
    with pytest.raises(SegXAIInputError, match=r"^batch_size 64 needs about .*use 2 or fewer"):
        GuidedBackprop(forward).attribute(x, aggregation="per_voxel", batch_size=64)


# ---- a process under a memory cap ----------------------------------------------------------------
_CAPPED = textwrap.dedent("""
    import contextlib, io, json, resource, sys
    import torch
    torch.set_num_threads(1)
    from SegXAILib.cli import main
    from SegXAILib.models import memory

    folder, headroom = sys.argv[1], int(sys.argv[2])
    common = ["-q", "explain", folder + "/image.nii.gz", "--model", folder + "/model_card.json", "--device", "cpu",
              "--method", "smoothgrad"]
    # a first small run loads every module and warms the allocator (so that the cap measures the work)
    assert main(common + ["--out", folder + "/warm", "--param", "n_samples=1", "--param", "batch_size=1"]) == 0
    size = memory._virtual_size()
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, resource.RLIM_INFINITY))
    result = {"available": memory.available_memory("cpu"), "headroom": headroom}
    for name, params in (("auto", ["n_samples=6"]), ("former_default", ["n_samples=6", "batch_size=4"]),
                         ("large", ["n_samples=64", "batch_size=64"])):
        errors = io.StringIO()
        with contextlib.redirect_stderr(errors):
            code = main(common + ["--out", folder + "/" + name, *sum((["--param", p] for p in params), [])])
        result[name] = {"code": code, "stderr": errors.getvalue()}
    print(json.dumps(result))
""")


def _write_case(folder: Path, size: int = 64) -> None:
    from monai.networks.nets import UNet

    from SegXAILib.image import Image
    from SegXAILib.io import write_image

    torch.manual_seed(0)
    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32], "strides": [2]}
    torch.save(UNet(**kwargs).state_dict(), folder / "model.pt")
    card = {
        "name": "capped-unet",
        "architecture": {"format": "monai", "name": "UNet", "kwargs": kwargs, "weights": "model.pt"},
        "input_channels": ["t1"],
        "classes": [{"name": "background", "color": [0, 0, 0]}, {"name": "thing", "color": [0, 255, 0]}],
        "preprocessing": {"orientation": "RAS", "spacing": None, "intensity": [{"kind": "zscore"}]},
        "inference": {"patch_size": [size] * 3, "overlap": 0.25},
        "output_activation": "softmax",
    }
    (folder / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    rng = np.random.default_rng(0)
    array = rng.normal(0, 1, size=(1, size, size, size)).astype(np.float32)
    array[0, 20:44, 20:44, 20:44] += 3.0
    write_image(Image(array, np.diag([1.0, 1.0, 1.0, 1.0])), folder / "image.nii.gz")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status: Linux")
def test_smoothgrad_under_an_address_space_cap_finishes_and_a_large_batch_is_refused(tmp_path):
    from conftest import make_forward
    from SegXAILib.attribution import ClassTarget

    _write_case(tmp_path)
    # the measured cost of one sample of this model on this volume (one 64^3 window)
    mask = torch.zeros((64, 64, 64), dtype=torch.bool)
    mask[20:44, 20:44, 20:44] = True
    from monai.networks.nets import UNet

    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=[16, 32], strides=[2])
    network.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    per_sample = make_forward(network, (64, 64, 64), ClassTarget(1, mask)).gradient_cost(
        torch.zeros(1, 1, 64, 64, 64)).per_sample_bytes
    # room for 3 samples: auto plans 2 (80 % of it), which leaves the allocator and the rest of the
    # process a sample of slack; the former default of 4 does not fit
    headroom = int(3 * per_sample)
    assert 4 * per_sample > headroom
    script = tmp_path / "capped.py"
    script.write_text(_CAPPED, encoding="utf-8")
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, str(script), str(tmp_path), str(headroom)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["available"] <= headroom  # the cap is what the library sees
    assert result["auto"]["code"] == 0, result["auto"]["stderr"]
    assert (tmp_path / "auto" / "maps" / "smoothgrad.json").exists()
    former = result["former_default"]
    assert former["code"] == 2 and "batch_size 4 needs about" in former["stderr"], former["stderr"]
    large = result["large"]
    assert large["code"] == 2
    assert "batch_size 64 needs about" in large["stderr"] and "or fewer" in large["stderr"]
    assert "Traceback" not in large["stderr"]
    assert not (tmp_path / "large").exists() and not (tmp_path / "former_default").exists()  # refused: no folder


# ---- out of memory inside a step -----------------------------------------------------------------
@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: "
                                                                 "you tried to allocate 25000000000 bytes")])
def test_out_of_memory_inside_a_step_is_exit_2_with_a_message(tmp_path, monkeypatch, capsys, error):
    from conftest import random_image, write_unet_card
    from SegXAILib.cli import main
    from SegXAILib.io import write_image
    from SegXAILib.pipeline import run as pipeline_run

    card = write_unet_card(tmp_path / "model")
    image = write_image(random_image("identity", shape=(16, 16, 16)), tmp_path / "image.nii.gz")

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(pipeline_run, "explain_map", exhausted)
    memory.note_estimate("smoothgrad: batch 4, about 23.1 GB and 5 min (estimated from one measured window)")
    code = main(["-q", "explain", str(image), "--model", str(card), "--method", "smoothgrad", "--out",
                 str(tmp_path / "out"), "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert code == 2
    assert "map smoothgrad: out of memory" in stderr
    assert "estimated before the run: smoothgrad: batch 4, about 23.1 GB" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_an_unrelated_runtime_error_is_not_taken_for_memory():
    assert not memory.is_out_of_memory(RuntimeError("shape mismatch"))
    assert memory.is_out_of_memory(MemoryError())


# ---- the time limit (cost pre-flight) ------------------------------------------------------------
def test_time_limit_refuses_guided_per_voxel_before_it_starts_and_confirmed_gives_the_same_map(forward_and_input):
    import threading

    from SegXAILib.attribution.guided import GuidedBackprop
    from SegXAILib.models.memory import SegXAICostRefused, cost_limit, current_cost_limit

    forward, x = forward_and_input
    seen = []
    assert current_cost_limit() is None  # the library's default: no limit
    with cost_limit(0.001):
        assert current_cost_limit() == 0.001
        with pytest.raises(SegXAICostRefused) as refused:
            GuidedBackprop(forward).attribute(x, aggregation="per_voxel", progress=lambda f, m="": seen.append(f))
        assert seen == []  # refused before the first batch: no progress at all
        # a thread does not inherit the limit (batch workers run with none): the same call finishes there
        in_thread = {}
        worker = threading.Thread(target=lambda: in_thread.update(
            map=GuidedBackprop(forward).attribute(x, aggregation="per_voxel")))
        worker.start()
        worker.join()
        # confirmed inside a limited block (what a front end does after asking): no limit
        with cost_limit(0):
            confirmed = GuidedBackprop(forward).attribute(x, aggregation="per_voxel")
    assert current_cost_limit() is None  # restored on leaving the block
    error = refused.value
    assert isinstance(error, SegXAIInputError)  # front ends that know only input errors still refuse cleanly
    # the estimate it carries: one voxel term per voxel of the class target (6 x 6 x 5 mask), each
    # estimated at one measured window pass (> 0 s), over the limit
    mask_voxels = 6 * 6 * 5
    assert error.items == mask_voxels and error.limit_seconds == 0.001 and error.seconds > 0.001
    assert error.bytes > 0 and error.details()["items"] == mask_voxels
    message = str(error)
    assert message.startswith(f"per-voxel maps: {mask_voxels} sample(s)")
    assert "estimated" in message and "over the time limit of 0.001 s" in message and "not started" in message
    assert 'aggregation="target"' in message and "Confirm" in message
    unlimited = GuidedBackprop(forward).attribute(x, aggregation="per_voxel")
    # exact: the same terms in the same batches whatever the limit (nothing switched method)
    torch.testing.assert_close(confirmed, unlimited, rtol=0, atol=0)
    torch.testing.assert_close(in_thread["map"], unlimited, rtol=0, atol=0)
    with cost_limit(3600.0):  # a limit above the estimate: runs, same map
        torch.testing.assert_close(GuidedBackprop(forward).attribute(x, aggregation="per_voxel"), unlimited,
                                   rtol=0, atol=0)
    with pytest.raises(SegXAIInputError, match="cost limit"):
        with cost_limit(-1.0):
            pass


def test_time_limit_refuses_instance_max_aggregation_naming_mean(forward_and_input):
    from conftest import make_forward, tiny_unet
    from SegXAILib.attribution import InstanceTarget
    from SegXAILib.instances import instance_smoothgrad
    from SegXAILib.models.memory import SegXAICostRefused, cost_limit

    _, x = forward_and_input
    lesion = torch.zeros(x.shape[2:], dtype=torch.bool)
    lesion[4:7, 6:9, 3:5] = True  # 18 voxels
    forward = make_forward(tiny_unet(), tuple(x.shape[2:]), InstanceTarget(1, lesion, instance_id=1), patch=(16, 16, 16))
    seen = []
    with cost_limit(0.001), pytest.raises(SegXAICostRefused) as refused:
        instance_smoothgrad(forward, x, n_samples=3, aggregation="max", progress=lambda f, m="": seen.append((f, m)))
    # one term per noise sample and voxel of the instance
    assert refused.value.items == 3 * 18
    # one window: the shared-forward path, refused on its own measurement (first forward and VJP
    # batch) before any batch is counted done; its estimate names that measurement
    assert seen == []
    assert "measured on the first forward and VJP batch" in refused.value.estimate
    assert 'aggregation "mean"' in str(refused.value) and "n_samples" in str(refused.value)


def test_segxai_explain_refuses_over_the_limit_and_runs_confirmed(tmp_path, capsys):
    from conftest import grid_matrix, write_voxelwise_card
    from SegXAILib.attribution import explain
    from SegXAILib.cli import main
    from SegXAILib.image import Image
    from SegXAILib.io import read_image, write_image
    from SegXAILib.models import load_model, load_model_card

    card = write_voxelwise_card(tmp_path / "model", orientation=None, threshold=50.0, patch=(8, 8, 8))
    bright = np.zeros((12, 10, 8), np.float32)
    bright[1:5, 1:5, 1:4] = 1.0
    bright[8:10, 6:9, 5:7] = 1.0
    bright *= np.random.default_rng(7).uniform(60.0, 140.0, bright.shape).astype(np.float32)
    image = Image(bright[None], grid_matrix("oblique"))
    path = write_image(image, tmp_path / "image.nii.gz")
    command = ["-q", "explain", str(path), "--model", str(card), "--device", "cpu", "--method", "guided_backprop"]
    tiny = ["--max-minutes", "0.00001"]  # 0.6 ms
    assert main(command + ["--out", str(tmp_path / "refused"), *tiny]) == 2
    stderr = capsys.readouterr().err
    # per-voxel aggregation (the default) over the class: one term per predicted voxel (48 + 12)
    assert "per-voxel maps: 60 sample(s)" in stderr and "over the time limit of 0.0006 s" in stderr
    assert 'aggregation="target"' in stderr and "--confirm-long" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "refused").exists()  # nothing written
    assert main(command + ["--out", str(tmp_path / "confirmed"), *tiny, "--confirm-long"]) == 0
    stderr = capsys.readouterr().err
    assert "segxai explain: estimate: per-voxel maps: 60 sample(s)" in stderr  # said before the work
    assert main(command + ["--out", str(tmp_path / "unlimited"), "--max-minutes", "0"]) == 0
    confirmed = read_image(tmp_path / "confirmed" / "maps" / "guided_backprop_ch0.nii.gz").array
    unlimited = read_image(tmp_path / "unlimited" / "maps" / "guided_backprop_ch0.nii.gz").array
    np.testing.assert_array_equal(confirmed, unlimited)
    # and the library's own map (no front end, no limit); float32 written and read back exactly
    direct = explain(image, load_model(load_model_card(card), device="cpu"), "guided_backprop").maps.array
    np.testing.assert_array_equal(confirmed, direct)
