"""A picture of the corruptions: rows are corruptions, columns clean + severities."""

from __future__ import annotations

from pathlib import Path

import torch


def write_preview(source, data, corruptions, severities, n_images: int, path: Path) -> Path:
    """Write a PNG grid: for each of the first ``n_images`` test images a block of columns
    (clean, then each severity), one row per corruption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    indices = list(range(min(n_images, len(data.test))))
    clean = torch.stack([data.test[i][0] for i in indices])
    cells = {(c, s): source.load(data, c, s, indices, seed=0)[0].cpu() for c in corruptions for s in severities}
    n_cols = len(indices) * (1 + len(severities))
    fig, axes = plt.subplots(len(corruptions), n_cols, figsize=(1.1 * n_cols, 1.1 * len(corruptions) + 0.4),
                             squeeze=False)
    for r, c in enumerate(corruptions):
        for j in range(len(indices)):
            panels = [("clean", clean[j])] + [(f"s{s}", cells[(c, s)][j]) for s in severities]
            for k, (title, image) in enumerate(panels):
                ax = axes[r][j * (1 + len(severities)) + k]
                picture = image.permute(1, 2, 0).clamp(0, 1).numpy()
                ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(title, fontsize=7)
            if j == 0:
                axes[r][0].set_ylabel(c, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"{data.name}: {source.description}", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
