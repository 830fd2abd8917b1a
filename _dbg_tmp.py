import torch, time
from SegXAILib.pipeline import resolve_model_card
from SegXAILib.models import load_model
from SegXAILib.phantoms import make_parotid_phantom
from SegXAILib.models.preprocessing import preprocess
from SegXAILib.attribution import SegmentationForward, ClassTarget
from SegXAILib.attribution.guided import per_voxel_sum
print(torch.get_num_threads())
m = load_model(resolve_model_card("parotid-S2"), "cpu")
ph = make_parotid_phantom("S2", 1002, shape=(32,32,32), spacing=(3.0,3.0,3.0))
x = preprocess(ph.image, m.card).as_tensor()[None]
with torch.no_grad(): lab = m.network(x).argmax(1)[0]
f = SegmentationForward(m.network, m.card, x.shape[2:], ClassTarget(1, lab==1))
for b in (8, 32, 64, 187):
    t=time.time(); per_voxel_sum(f, x, "guided", batch_size=b); print(b, time.time()-t)
