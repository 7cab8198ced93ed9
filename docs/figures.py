"""The figure of docs/concepts.md: singular values of the unfoldings of a trained LoRA's layer stack.

    .venv/bin/python docs/figures.py            # writes docs/img/lora_unfolding_spectra.png

Trains a rank-8 PEFT LoRA on ``query`` and ``value`` of the packaged all-MiniLM-L6-v2 for
50 steps (SST-2's train file when ../shared/data/sst2 or $TENSORLOTR_SST2 holds it, else
the built-in sentiment task), stacks each projection's updates ``dW_l = scale * B_l A_l``
into ``(L, d_out, d_in) = (6, 384, 384)``, and plots, per projection, the singular values of

- the mode-1 unfolding ``[dW_1, …, dW_L]`` (d_out x L*d_in), whose column space ``U`` spans;
- the mode-2 unfolding ``[dW_1^T, …, dW_L^T]`` (d_in x L*d_out), whose column space ``V`` spans;
- all layers' own singular values pooled and sorted: what the unfoldings would show if no
  two layers shared a direction;
- the mode-1 unfolding of a random LoRA of the same shapes, ranks and norm.

It prints the ranks that keep 90% and 99% of each spectrum's energy, the mean over layer
pairs of the largest cosine between their rank-8 column spaces, each layer's update norm
relative to the largest, and the ranks that ``tensorlotr convert --energy 0.9`` picks for
this LoRA. CPU only; a few minutes, most of it training.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "img" / "lora_unfolding_spectra.png"
RANK, STEPS, BATCH, LR, MAX_LENGTH, SEED = 8, 50, 16, 2e-3, 64, 0
ENERGY = 0.9
TARGETS = ("query", "value")


def sst2_train() -> Path | None:
    """SST-2's train.tsv from $TENSORLOTR_SST2 or ../shared/data/sst2, if present."""
    for folder in (os.environ.get("TENSORLOTR_SST2"), HERE.parents[1] / "shared" / "data" / "sst2"):
        if folder and (Path(folder) / "train.tsv").is_file():
            return Path(folder) / "train.tsv"
    return None


def train_lora(steps: int, save_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """A PEFT LoRA trained for ``steps`` steps and saved in ``save_dir``.

    Returns each target's stack of updates (L, d_out, d_in) and the name of the data.
    """
    from peft import LoraConfig, get_peft_model

    from tensorlotr.data import builtin_sentiment, read_tsv
    from tensorlotr.demo import default_model_dir, load_classifier

    train_file = sst2_train()
    if train_file is not None:
        rows, data_name = read_tsv(train_file, limit=steps * BATCH), "SST-2 train"
    else:
        rows, data_name = builtin_sentiment(SEED)[0], "built-in sentiment task"
    tokenizer, model = load_classifier(default_model_dir(), seed=SEED)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS), modules_to_save=["classifier"])
    lora = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=LR)
    generator = torch.Generator().manual_seed(SEED)
    lora.train()
    for step in range(steps):
        batch = [rows[int(i)] for i in torch.randint(len(rows), (BATCH,), generator=generator)]
        texts = [s for s, _ in batch]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        loss = lora(**enc, labels=torch.tensor([y for _, y in batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    stacks: dict[str, list[np.ndarray]] = {t: [] for t in TARGETS}
    for name, module in lora.named_modules():
        target = name.rsplit(".", 1)[-1]
        if target in TARGETS and hasattr(module, "lora_A"):
            b = module.lora_B["default"].weight.detach().double()
            a = module.lora_A["default"].weight.detach().double()
            stacks[target].append((module.scaling["default"] * b @ a).numpy())
    lora.save_pretrained(save_dir)
    return {t: np.stack(s) for t, s in stacks.items()}, data_name


def random_lora_like(stack: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian ``B_l A_l`` of rank ``RANK`` per layer, scaled to the Frobenius norm of ``stack``."""
    n_layers, d_out, d_in = stack.shape
    dense = np.stack([rng.standard_normal((d_out, RANK)) @ rng.standard_normal((RANK, d_in)) for _ in range(n_layers)])
    return dense * (np.linalg.norm(stack) / np.linalg.norm(dense))


def spectra(stack: np.ndarray) -> dict[str, np.ndarray]:
    """Singular values of both unfoldings, and of every layer pooled, of a stack (L, d_out, d_in)."""
    per_layer = np.concatenate([np.linalg.svd(m, compute_uv=False) for m in stack])
    return {
        "mode 1 (U)": np.linalg.svd(np.concatenate(list(stack), axis=1), compute_uv=False),
        "mode 2 (V)": np.linalg.svd(np.concatenate([m.T for m in stack], axis=1), compute_uv=False),
        "layers pooled": np.sort(per_layer)[::-1],
    }


def energy_rank(singular_values: np.ndarray, fraction: float) -> int:
    """The smallest rank whose leading squared singular values hold ``fraction`` of the total."""
    energy = np.cumsum(singular_values**2) / np.sum(singular_values**2)
    return int(np.searchsorted(energy, fraction - 1e-12) + 1)


def layer_overlap(stack: np.ndarray) -> float:
    """Mean over layer pairs of the largest cosine between their rank-``RANK`` column spaces (1: shared)."""
    bases = [np.linalg.svd(m, full_matrices=False)[0][:, :RANK] for m in stack]
    pairs = [(i, j) for i in range(len(bases)) for j in range(i + 1, len(bases))]
    return float(np.mean([np.linalg.svd(bases[i].T @ bases[j], compute_uv=False)[0] for i, j in pairs]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(SEED)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tensorlotr.convert import convert_lora

    with tempfile.TemporaryDirectory() as tmp:
        stacks, data_name = train_lora(args.steps, Path(tmp) / "lora")
        converted = convert_lora(Path(tmp) / "lora", None, energy=ENERGY)
    rng = np.random.default_rng(SEED)
    randoms = {t: random_lora_like(s, rng) for t, s in stacks.items()}
    shown = next(iter(stacks.values())).shape[0] * RANK  # the unfoldings have rank at most L * r

    fig, axes = plt.subplots(1, len(TARGETS), figsize=(10, 3.8), sharey=True)
    for ax, target in zip(axes, TARGETS, strict=True):
        curves = {f"trained, {k}": v for k, v in spectra(stacks[target]).items()}
        curves["random LoRA, mode 1"] = spectra(randoms[target])["mode 1 (U)"]
        for (label, values), style in zip(curves.items(), ("-", "-", ":", "--"), strict=True):
            values = values[:shown]
            ax.semilogy(np.arange(1, shown + 1), values / values[0], style, marker=".", markersize=3, label=label)
        ax.axvline(RANK, color="grey", linewidth=0.8)
        ax.set_title(f"{target}: {stacks[target].shape[0]} layers of 384 x 384, LoRA rank {RANK}", fontsize=10)
        ax.set_xlabel("index i")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(r"$\sigma_i / \sigma_1$")
    axes[-1].legend(fontsize=8)
    fig.suptitle(
        f"all-MiniLM-L6-v2, PEFT LoRA on query and value, {args.steps} steps on the {data_name} "
        f"(grey line: i = r = {RANK})",
        fontsize=10,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110, metadata={"Software": None})
    print(f"wrote {args.out}")
    print("ranks keeping 90% / 99% of the energy")
    for target in TARGETS:
        for kind, stack in (("trained", stacks[target]), ("random", randoms[target])):
            ranks = "  ".join(f"{k}: {energy_rank(v, 0.9)} / {energy_rank(v, 0.99)}" for k, v in spectra(stack).items())
            print(f"  {target:5s} {kind:7s} {ranks}  layer overlap {layer_overlap(stack):.2f}")
    for target in TARGETS:
        norms = np.linalg.norm(stacks[target], axis=(1, 2))
        print(f"  {target:5s} layer norms / largest: {np.array2string(norms / norms.max(), precision=2)}")
    ranks = ", ".join(f"{g.group} {g.rank[0]}x{g.rank[1]}" for g in converted.groups)
    print(f"tensorlotr convert --energy {ENERGY} on this LoRA: ranks {ranks}")


if __name__ == "__main__":
    main()
