import torch
torch.set_num_threads(1)
from manip.checkpoint import load_acting_module
from manip.export import load_exported
m, cfg, ns = load_acting_module("r2/checkpoints/last.ckpt")
ex = load_exported("r2.pt2")
obs = m.obs_mean[None] + m.obs_scale[None] * torch.randn(4, m.obs_dim)
noise = torch.randn(4, *ex.meta["noise_shape"])
with torch.inference_mode():
    raw = m.agent.sample_actions(m.normalize(obs), noise=noise.flatten(0, 1)).view(4, 5, -1)
    with m.acting_weights():
        ema = m.agent.sample_actions(m.normalize(obs), noise=noise.flatten(0, 1)).view(4, 5, -1)
e = ex(obs, noise)
print("export-ema", (e - ema).abs().max().item(), "export-raw", (e - raw).abs().max().item())
