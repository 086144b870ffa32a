"""Gate statistics of a trained scnl-gate or select-salient run (its keep map) on a task with masks (share of pixels open on the tag box, its ink,
the object's ink, the background) and a PNG of records, gates and messages: python benchmarks/maskfree_gates.py RUN [OUT.png [TITLE]]."""
import sys, torch
from veil.training.run import load_run
torch.set_num_threads(1)
cfg, task, d, model = load_run(sys.argv[1])
s = task.test
x, m = s.x[:1000], s.mask[:1000].bool()
d.eval()
with torch.no_grad():
    g = d.kept(x) if hasattr(d, "kept") else d.gates(x)[0]  # select-salient's keep map, or scnl-gate's gates
    h = d.encode(x)
g = g > 0.5
ink = x > 0.3
tag_ink = ink & m
obj_ink = ink & ~m
bg = ~ink & ~m
share = lambda sel: float(g[sel].float().mean())
print(f"open share: all {float(g.float().mean()):.3f}  tag box {share(m):.3f}  tag ink {share(tag_ink):.3f}  object ink (outside box) {share(obj_ink):.3f}  background {share(bg):.3f}")
if len(sys.argv) > 2:
    import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
    n = 8
    f, ax = plt.subplots(3, n, figsize=(1.6 * n, 5))
    for i in range(n):
        for r, (img, t) in enumerate(((x[i, 0], f"y{int(s.y[i])} z{int(s.z[i])}"), (g[i, 0].float(), "gate"), (h[i, 0], "message"))):
            ax[r, i].imshow(img, cmap="gray"); ax[r, i].set_xticks([]); ax[r, i].set_yticks([])
            if i == 0: ax[r, i].set_ylabel(["record", "open / kept (white)", "message"][r])
        ax[0, i].set_title(f"y{int(s.y[i])} z{int(s.z[i])}", fontsize=8)
    f.suptitle(sys.argv[3] if len(sys.argv) > 3 else sys.argv[1], fontsize=9)
    plt.tight_layout(); plt.savefig(sys.argv[2], dpi=80)
