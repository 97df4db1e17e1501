"""One DT block's training step at 1 torch thread: fp32 against bf16 autocast, NCHW against channels_last,
batch 128 and 256 (Fashion-MNIST's 28x28 shape), side by side in one process. Prints ms per step and
samples/s. ``python benchmarks/block_step.py``"""
import time, torch, sys
from noprop_dist.core.blocks import ModelSpec, DTBlock
torch.set_num_threads(1)
spec = ModelSpec(image_shape=(1,28,28), num_classes=10, num_blocks=10, embedding="learned", embed_dim=20,
                 dropout=0.2, class_prob="softmax", radial_sigma=0.1, eta=0.1, abar_max=0.999)
for bs in (128, 256):
  for mode in ("fp32", "bf16", "fp32_cl", "bf16_cl"):
    torch.manual_seed(0)
    b = DTBlock(spec)
    opt = torch.optim.AdamW(b.parameters(), 1e-3)
    x = torch.randn(bs,1,28,28); z = torch.randn(bs,20); y = torch.randint(0,10,(bs,))
    if mode.endswith("cl"):
        b = b.to(memory_format=torch.channels_last); x = x.contiguous(memory_format=torch.channels_last)
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")):
            out = b(z, x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(); loss.backward(); opt.step()
    for _ in range(3): step()
    t=time.perf_counter(); n=10
    for _ in range(n): step()
    dt=(time.perf_counter()-t)/n
    print(bs, mode, f"{dt*1e3:.1f} ms/step {bs/dt:.0f} samples/s", flush=True)
