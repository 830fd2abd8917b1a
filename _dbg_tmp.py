import torch, time, numpy as np
from scipy import ndimage
from SegXAILib.pipeline import resolve_model_card
from SegXAILib.models import load_model
from SegXAILib.phantoms import make_parotid_phantom
from SegXAILib.models.preprocessing import preprocess
from SegXAILib.attribution import SegmentationForward, ClassTarget
from SegXAILib.attribution.guided import GuidedBackprop, Deconvolution, per_voxel_sum
from SegXAILib.attribution.cam import GradCAM
torch.set_num_threads(2)
m = load_model(resolve_model_card("parotid-S2"), "cpu")
def ball_mass(a, centre, r=5):
    idx = np.indices(a.shape)
    d2 = sum((idx[i]-centre[i])**2 for i in range(3))
    return a[d2 <= r*r].sum()
for seed in (1000,1001,1002):
    ph = make_parotid_phantom("S2", seed, shape=(32,32,32), spacing=(3.0,3.0,3.0))
    x = preprocess(ph.image, m.card).as_tensor()[None]
    with torch.no_grad(): lab = m.network(x).argmax(1)[0]
    f = SegmentationForward(m.network, m.card, x.shape[2:], ClassTarget(1, lab==1))
    gland = ph.label.array[0] > 0; rod = ph.rod.array[0] > 0
    head = ph.image.array[0] > 0.05
    c = np.array(ndimage.center_of_mass(gland))
    rv = np.argwhere(rod); tip = rv[np.argmin(((rv-c)**2).sum(1))]
    print(seed, "pred", int(lab.sum()), "dice", 2*(lab.numpy()&gland).sum()/(lab.numpy().sum()+gland.sum()), "tip", tip, "centroid", c.round(1))
    for name, fn in [("gb_target", lambda: GuidedBackprop(f).attribute(x)),
                     ("gb_pervoxel", lambda: GuidedBackprop(f).attribute(x, aggregation="per_voxel", batch_size=32)),
                     ("deconv", lambda: Deconvolution(f).attribute(x)),
                     ("grad", lambda: f.gradient(x)),
                     ("cam", lambda: GradCAM(f).attribute(x))]:
        t = time.time(); a = fn()[0,0].abs().numpy(); dt = time.time()-t
        rng = np.random.default_rng(0)
        inside = np.argwhere(head)
        rand = np.mean([ball_mass(a, inside[i]) for i in rng.integers(len(inside), size=200)])
        print(f"  {name}: {dt:.1f}s total {a.sum():.3g} tip {ball_mass(a, tip):.3g} rand {rand:.3g} ratio {ball_mass(a,tip)/max(rand,1e-30):.2f}")
