"""Sparse autoencoders: SAELens/sparsify formats, the streaming trainer, feature sites, feature lesions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from neuroprobe import Battery, load_subject, open_recording
from neuroprobe.analysis.synthetic import make_stimuli, write_recording
from neuroprobe.electrodes import Electrodes, record_once
from neuroprobe.errors import NeuroprobeError, RecordingError
from neuroprobe.recording.recorder import Recorder
from neuroprobe.sae import SparseAutoencoder, TrainConfig, attach, load_sae, save_sae, train_sae
from neuroprobe.sae.io import SAELENS_CFG, SAELENS_WEIGHTS
from neuroprobe.sae.sites import edit_source
from neuroprobe.sae.train import RowSource, row_stats

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "sae"
SITE = "encoder.layer.1.mlp"
KINSHIP = ["mother", "dog", "red"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "neuroprobe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def random_sae(d_in: int, d_sae: int, *, architecture: str = "topk", k: int = 4, seed: int = 0, **kw) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_sae, d_in, generator=g)
    return SparseAutoencoder(w.T.contiguous() * 0.5, torch.randn(d_sae, generator=g) * 0.1, w / w.norm(dim=1, keepdim=True),
                             torch.randn(d_in, generator=g) * 0.05, architecture=architecture,
                             k=k if architecture == "topk" else None,
                             threshold=torch.rand(d_sae, generator=g) * 0.1 if architecture == "jumprelu" else None, **kw)


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("name", ["saelens_standard", "saelens_jumprelu", "saelens_topk", "sparsify_topk"])
def test_saes_written_by_their_libraries_load_and_compute_as_there(name):
    """Folders written by SAELens' ``save_model`` / sparsify's ``save_to_disk``; expected outputs are the libraries' own."""
    sae = load_sae(FIXTURES / name)
    want = load_file(str(FIXTURES / name / "expected.safetensors"))
    f = sae.encode(want["x"])
    scale = float(want["feature_acts"].abs().max())
    assert torch.allclose(f, want["feature_acts"], rtol=0, atol=1e-6 * scale)
    assert torch.equal(f > 0, want["feature_acts"] > 0)  # the same features fire
    assert torch.allclose(sae.decode(f), want["reconstruction"], rtol=0, atol=1e-6 * float(want["reconstruction"].abs().max()))
    assert sae.meta["format"] == ("sparsify" if name.startswith("sparsify") else "saelens")
    if name.startswith("saelens"):
        assert sae.meta["hook_name"] == SITE


def test_saved_sae_has_saelens_fields_and_round_trips(tmp_path):
    """cfg.json and the weights carry exactly the fields of SAELens 6's SAEConfig / state dict."""
    for arch in ("standard", "jumprelu", "topk"):
        sae = random_sae(12, 20, architecture=arch)
        out = save_sae(sae, tmp_path / arch, hook_name=SITE, model_name="bert")
        cfg = json.loads((out / SAELENS_CFG).read_text())
        base = {"d_in": 12, "d_sae": 20, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                "normalize_activations": "none", "reshape_activations": "none", "architecture": arch}
        assert {k: cfg[k] for k in base} == base
        assert set(cfg) == set(base) | {"metadata"} | ({"k", "rescale_acts_by_decoder_norm"} if arch == "topk" else set())
        assert cfg["metadata"]["hook_name"] == SITE and cfg["metadata"]["model_name"] == "bert"
        assert cfg["metadata"]["sae_lens_version"] >= "6"  # read as a SAELens 6 config, not converted as pre-6
        tensors = load_file(str(out / SAELENS_WEIGHTS))
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        want = {"W_enc": (12, 20), "b_enc": (20,), "W_dec": (20, 12), "b_dec": (12,)} | ({"threshold": (20,)} if arch == "jumprelu" else {})
        assert shapes == want and all(v.dtype == torch.float32 for v in tensors.values())
        back = load_sae(out)
        assert back.content_hash() == sae.content_hash() and back.architecture == arch and back.k == sae.k
        x = torch.randn(5, 12)
        assert torch.equal(back.encode(x), sae.encode(x))


def test_saved_sae_loads_in_saelens(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = random_sae(12, 20, architecture="topk")
    theirs = sae_lens.SAE.load_from_disk(save_sae(sae, tmp_path / "s", hook_name=SITE))
    x = torch.randn(6, 12)
    assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-6)


def test_saes_neuroprobe_cannot_represent_are_refused_in_one_sentence(tmp_path):
    src = FIXTURES / "saelens_standard"
    cases = {"gated": {"architecture": "gated"}, "norm": {"normalize_activations": "layer_norm"}}
    for name, change in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / SAELENS_WEIGHTS).write_bytes((src / SAELENS_WEIGHTS).read_bytes())
        cfg = json.loads((src / SAELENS_CFG).read_text()) | change
        (d / SAELENS_CFG).write_text(json.dumps(cfg))
        with pytest.raises(NeuroprobeError) as err:
            load_sae(d)
        assert "\n" not in str(err.value)
    d = tmp_path / "transcoder"
    d.mkdir()
    cfg = json.loads((FIXTURES / "sparsify_topk" / SAELENS_CFG).read_text()) | {"transcode": True}
    (d / SAELENS_CFG).write_text(json.dumps(cfg))
    (d / "sae.safetensors").write_bytes((FIXTURES / "sparsify_topk" / "sae.safetensors").read_bytes())
    with pytest.raises(NeuroprobeError, match="transcoder"):
        load_sae(d)
    with pytest.raises(NeuroprobeError, match=r"several SAEs \(gated, norm, transcoder\)"):
        load_sae(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(NeuroprobeError, match="holds no SAE"):
        load_sae(tmp_path / "empty")


# ------------------------------------------------------------------ trainer


def planted_recording(path: Path, n: int = 1200, d_in: int = 32, n_atoms: int = 24, per_row: int = 3, seed: int = 0) -> np.ndarray:
    """Rows that are sparse non-negative combinations of ``n_atoms`` unit directions (ground truth for the trainer)."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(n_atoms, d_in))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n, n_atoms))
    for i in range(n):
        codes[i, rng.choice(n_atoms, per_row, replace=False)] = rng.uniform(0.5, 2.0, per_row)
    x = (codes @ atoms + 0.3).astype(np.float32)
    stim = make_stimuli(n // 20, 20, forms=(("text-name", "text"),))
    write_recording(path, stim, {"site.a": x}, batch_size=64)
    return x


def test_streamed_statistics_equal_in_memory_ones(tmp_path):
    x = planted_recording(tmp_path / "p.h5", n=400)
    with open_recording(tmp_path / "p.h5") as rec:
        src = RowSource(rec, "site.a", block_mb=2000 * 4 / 2**20)  # 2000 values: 62 rows a block
        assert len(src.blocks) == 7 and src.data == "responses"
        st = row_stats(src)
        screening = RowSource(rec, "site.a", split="screening")
        assert sum(len(b) for b in screening.iter_blocks()) == 200
    x64 = x.astype(np.float64)
    assert st.n == 400
    np.testing.assert_allclose(st.mean, x64.mean(0), rtol=0, atol=1e-12)
    assert st.variance == pytest.approx(((x64 - x64.mean(0)) ** 2).sum(1).mean(), rel=1e-12)
    assert st.mean_norm == pytest.approx(np.linalg.norm(x64, axis=1).mean(), rel=1e-12)


@pytest.mark.parametrize("objective,fve", [("topk", 0.97), ("relu", 0.9)])
def test_trainer_reconstructs_a_planted_sparse_code(tmp_path, objective, fve):
    """Rows are 3-sparse in 24 atoms: a 48-feature SAE trained from disk explains them, and says how well."""
    x = planted_recording(tmp_path / "p.h5")
    cfg = TrainConfig(features=48, objective=objective, k=4, l1=1.0, epochs=60, batch_size=128, lr=3e-3, block_mb=0.05)
    with open_recording(tmp_path / "p.h5") as rec:
        res = train_sae(rec, "site.a", cfg)
    s = res.summary
    assert s["rows"] == len(x) and s["steps"] == 60 * 10 and s["d_in"] == 32
    assert s["fve"] > fve, s
    # the summary's numbers are the saved SAE's own, recomputed here in float64
    xt = torch.from_numpy(x)
    f = res.sae.encode(xt)
    sse = float(((res.sae.decode(f) - xt).double() ** 2).sum())
    sst = float(((x.astype(np.float64) - x.mean(0)) ** 2).sum())
    assert s["fve"] == pytest.approx(1 - sse / sst, abs=1e-5)
    assert s["dead"] == int(((f > 0).sum(0) == 0).sum())
    assert s["l0"] == pytest.approx(float((f > 0).sum(-1).float().mean()), rel=1e-6)
    if objective == "topk":
        assert s["l0"] <= 4
    assert list(res.curve.columns[:4]) == ["step", "rows", "loss", "nmse"] and res.curve["step"].iloc[-1] == s["steps"]
    assert res.curve["nmse"].iloc[-1] < res.curve["nmse"].iloc[0]


def test_sae_train_cli_writes_saelens_folder_curve_and_numbers(tmp_path):
    planted_recording(tmp_path / "p.h5")
    out = tmp_path / "sae"
    res = run_cli("sae", "train", str(tmp_path / "p.h5"), "--site", "site.a", "--features", "32", "--k", "4",
                  "--epochs", "5", "--batch-size", "128", "--out", str(out), "-q")
    assert res.returncode == 0, res.stderr
    assert "FVE" in res.stdout and "dead" in res.stdout
    assert {p.name for p in out.iterdir()} >= {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "training.csv", "training.json"}
    summary = json.loads((out / "training.json").read_text())
    sae = load_sae(out)
    assert summary["sae_hash"] == sae.content_hash() and summary["dead"] >= 0 and 0 < summary["fve"] <= 1
    assert summary["peak_rss_mib"] > 0 and summary["cpu_s"] > 0 and sae.meta["hook_name"] == "site.a"
    assert len(pd.read_csv(out / "training.csv")) >= 1
    again = run_cli("sae", "train", str(tmp_path / "p.h5"), "--site", "site.a", "--features", "32", "--out", str(out))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    bad = run_cli("sae", "train", str(tmp_path / "p.h5"), "--site", "nope", "--features", "8", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and bad.stderr.startswith("neuroprobe: error: ") and bad.stderr.count("\n") == 1


# ------------------------------------------------------------- feature sites


@pytest.fixture(scope="module")
def bert(tiny_dir):
    return load_subject("bert", weights=tiny_dir("bert"), device="cpu", quiet=True)


@pytest.fixture(scope="module")
def small_kinship() -> Battery:
    full = Battery.load("kinship")
    rows = full.table[full.table["concept"].isin(KINSHIP)]
    return Battery.from_table(rows, concepts={c: full.concepts[c] for c in KINSHIP}, name="tiny", root=full.root)


def site_width(subject, battery) -> int:
    site = subject.sites(SITE)[0]
    batch = subject.encode(battery.table.iloc[:2], battery)
    with torch.inference_mode():
        return int(record_once(subject.model, [site], lambda: subject.forward(batch))[SITE].shape[-1])


def fresh(subject):
    """The subject without attached SAEs (tests attach their own)."""
    subject._feature_sites = {}
    return subject


def test_recorded_features_equal_the_encoder_on_the_recorded_site(bert, small_kinship, tmp_path):
    subject = fresh(bert)
    sae = random_sae(site_width(subject, small_kinship), 40, k=6)
    save_sae(sae, tmp_path / "sae", hook_name=SITE)
    sae = load_sae(tmp_path / "sae")
    plain = Recorder(subject, small_kinship, montage=SITE, tokens=True, quiet=True, batch_size=8).run(tmp_path / "plain.h5")
    attach(subject, sae)
    rec_path = Recorder(subject, small_kinship, montage=SITE, tokens=True, quiet=True, batch_size=8).run(tmp_path / "f.h5")
    with open_recording(rec_path) as rec, open_recording(plain) as ref:
        assert rec.site_names == [SITE, SITE + ":sae"]
        info = rec.sites.set_index("site").loc[SITE + ":sae"]
        assert info["kind"] == "sae" and info["n_units"] == 40 and info["stream"] == "text"
        attrs = rec.site_attrs(SITE + ":sae")
        assert attrs["source"] == SITE and attrs["sae_hash"] == sae.content_hash() and attrs["sae_path"] == str((tmp_path / "sae").resolve())
        assert rec.attrs["saes"] == {SITE + ":sae": sae.content_hash()}
        # the source site is recorded exactly as without the SAE
        assert np.array_equal(rec.responses(SITE)[()], ref.responses(SITE)[()])
        assert np.array_equal(rec.tokens(SITE)[()], ref.tokens(SITE)[()])
        x = torch.from_numpy(rec.tokens(SITE)[()])
        f = rec.tokens(SITE + ":sae")[()]
        want = sae.encode(x).numpy()
        diff = float(np.abs(f - want).max())
        assert diff <= 1e-5 * float(np.abs(want).max()), diff  # float32; 0.0 in our runs
        off = rec.token_offsets("text")
        pooled = np.stack([want[off[i] : off[i + 1]].mean(0) for i in range(len(off) - 1)])
        np.testing.assert_allclose(rec.responses(SITE + ":sae")[()], pooled, rtol=0, atol=1e-5 * float(np.abs(want).max()))
        assert (f > 0).sum(1).max() <= 6
    fresh(subject)


def test_resuming_with_another_sae_is_refused(bert, small_kinship, tmp_path):
    subject = fresh(bert)
    width = site_width(subject, small_kinship)
    attach(subject, random_sae(width, 16, seed=1), SITE)
    Recorder(subject, small_kinship, montage=SITE, quiet=True, batch_size=8).run(tmp_path / "r.h5")
    with h5py.File(tmp_path / "r.h5", "r+") as f:  # pretend it was interrupted
        f.attrs["complete"] = False
        f.attrs["n_done"] = 8
    fresh(subject)
    attach(subject, random_sae(width, 16, seed=2), SITE)
    with pytest.raises(RecordingError, match="saes"):
        Recorder(subject, small_kinship, montage=SITE, quiet=True, batch_size=8).run(tmp_path / "r.h5", resume=True)
    fresh(subject)


def test_record_cli_with_sae_and_errors(tiny_dir, small_kinship, bert, tmp_path):
    width = site_width(fresh(bert), small_kinship)
    for d in (24, 48):
        save_sae(random_sae(width, d, seed=d), tmp_path / f"sae{d}", hook_name=SITE)
    common = ["record", "--model", "bert", "--weights", str(tiny_dir("bert")), "--probe", "kinship", "--sites",
              "encoder.layer.0.mlp", "-q", "--batch-size", "64"]
    res = run_cli(*common, "--sae", f"{tmp_path / 'sae24'},{tmp_path / 'sae48'}@{SITE}", "--out", str(tmp_path / "r.h5"))
    assert res.returncode == 0, res.stderr
    with open_recording(tmp_path / "r.h5") as rec:
        # the SAEs' source site joins the montage; two SAEs at one site are named by size
        assert rec.site_names == ["encoder.layer.0.mlp", SITE, f"{SITE}:sae-24", f"{SITE}:sae-48"]
        assert rec.responses(f"{SITE}:sae-48").shape == (len(Battery.load("kinship")), 48)
    missing = run_cli(*common, "--sae", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.h5"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "does not exist" in missing.stderr
    assert not (tmp_path / "m.h5").exists()
    wrong = run_cli(*common, "--sae", f"{tmp_path / 'sae24'}@encoder.layer.1.attn", "--out", str(tmp_path / "w.h5"))
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "reads" in wrong.stderr


# ------------------------------------------------------------- feature lesions


def _source_under(subject, battery, edits, sites) -> torch.Tensor:
    batch = subject.encode(battery.table.iloc[:6], battery)
    src = subject.sites(SITE)[0]
    with torch.inference_mode(), Electrodes(subject.model, [src] + sites, sites_to_read=[SITE], edits=edits) as el:
        subject.forward(batch)
    return el.data[SITE]


def test_empty_feature_lesion_is_a_bitwise_no_op(bert, small_kinship):
    from neuroprobe.lesions.staged import replica_edits

    subject = fresh(bert)
    fs = attach(subject, random_sae(site_width(subject, small_kinship), 32, architecture="standard"), SITE)
    intact = _source_under(subject, small_kinship, {}, [])
    same = _source_under(subject, small_kinship, {fs.name: lambda f, s: f.clone()}, [fs])
    assert torch.equal(same.view(torch.int32), intact.view(torch.int32))  # bit for bit, signed zeros included
    # a replica that lesions no feature, beside one that does
    both = replica_edits([{}, {fs.name: np.array([0, 1, 2])}], "zero")
    batch = subject.encode(small_kinship.table.iloc[:6], small_kinship)
    doubled = type(batch)({k: (torch.cat([v, v]) if torch.is_tensor(v) else v) for k, v in batch.inputs.items()},
                          batch.masks, batch.token_ids, batch.concept_masks)
    src = subject.sites(SITE)[0]
    with torch.inference_mode(), Electrodes(subject.model, [src, fs], sites_to_read=[SITE], edits=both) as el:
        subject.forward(doubled)
    assert torch.equal(el.data[SITE][:6].view(torch.int32), intact.view(torch.int32))
    assert not torch.equal(el.data[SITE][6:], intact)
    fresh(subject)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_feature_lesion_moves_the_site_by_exactly_its_decoder_contribution(bert, small_kinship, architecture):
    from neuroprobe.lesions import lesion

    subject = fresh(bert)
    sae = random_sae(site_width(subject, small_kinship), 32, architecture=architecture, k=8,
                     rescale_acts_by_decoder_norm=architecture == "topk")
    fs = attach(subject, sae, SITE)
    intact = _source_under(subject, small_kinship, {}, [])
    f = sae.encode(intact)
    units = np.flatnonzero((f > 0).reshape(-1, 32).any(0).numpy())[:3]
    assert len(units) == 3
    with lesion(subject, {fs.name: units}):
        batch = subject.encode(small_kinship.table.iloc[:6], small_kinship)
        with torch.inference_mode():
            got = record_once(subject.model, subject.sites(SITE), lambda: subject.forward(batch))[SITE]
    contribution = (f[..., units].double() @ sae.directions().double()[units])  # the features' decoder contribution
    change = got.double() - intact.double()
    assert float((change + contribution).abs().max()) <= 1e-6 * float(intact.abs().max())
    # and it is the edit's own float32 arithmetic: x + (0 - f) @ directions, bit for bit
    assert torch.equal(got, edit_source(sae, intact, f, f.index_fill(-1, torch.as_tensor(units), 0.0)))
    untouched = contribution.abs().sum(-1) == 0  # tokens where none of the features fired
    assert torch.equal(got[untouched], intact[untouched])
    fresh(subject)


def test_feature_lesion_study_batched_equals_single_and_has_random_feature_nulls(bert, small_kinship):
    from neuroprobe.lesions import LesionStudy

    subject = fresh(bert)
    fs = attach(subject, random_sae(site_width(subject, small_kinship), 32, architecture="standard"), SITE)
    study = LesionStudy(subject, small_kinship, None, sites=fs.name, readout="prototype", quiet=True, batch_size=16)
    assert study.engine.startswith("batched") and study.site_names == [fs.name]
    top = study.top("mother", 3)
    rng = np.random.default_rng(0)
    lesions = [top] + [study.random(top, rng) for _ in range(4)]
    many = study.evaluate_many(lesions, "zero")
    single = [study.evaluate(les, "zero") for les in lesions]
    for a, b in zip(single, many):
        np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=0, atol=1e-5)
    assert any(float(s.abs().max()) > 0 for s in single)
    dose = study.dose_response("mother", [1, 3], ["zero", "mean"], random_draws=5, keep_draws=0, orders=["top", "random"])
    assert set(dose["order"]) == {"top", "random"}
    assert (dose[dose["order"] == "random"].groupby(["mode", "k"]).size() == 5).all()  # 5 random-feature lesions each
    fresh(subject)


def test_recorded_feature_sites_go_through_cells_export_and_lesion_studies(bert, small_kinship, tmp_path):
    """cells and export read a feature site like any site; a lesion study brings the recorded SAE back by itself."""
    from neuroprobe import concept_cells
    from neuroprobe.lesions import LesionStudy
    from neuroprobe.sae.sites import attach_recorded

    subject = fresh(bert)
    folder = save_sae(random_sae(site_width(subject, small_kinship), 24, architecture="standard"), tmp_path / "sae", hook_name=SITE)
    attach(subject, load_sae(folder))
    path = Recorder(subject, small_kinship, montage=SITE, quiet=True, batch_size=16).run(tmp_path / "r.h5")
    fresh(subject)
    with open_recording(path) as rec:
        cells = concept_cells(rec)
        assert set(cells["site"]) == {SITE, SITE + ":sae"} and (cells["site"] == SITE + ":sae").sum() == 24
        assert (cells.loc[cells["site"] == SITE + ":sae", "kind"] == "sae").all()
        study = LesionStudy(subject, small_kinship, rec, readout="prototype", quiet=True, batch_size=16)
        assert study.site_names == [SITE, SITE + ":sae"] and [s.name for s in subject.feature_sites()] == [SITE + ":sae"]
        assert study.top("dog", 2) is not None
        pytest.importorskip("pynwb")
        from neuroprobe.export.nwb import export_nwb

        export_nwb(rec, tmp_path / "r.nwb")
    fresh(subject)
    save_sae(random_sae(site_width(subject, small_kinship), 24, seed=5), folder, hook_name=SITE)  # another SAE in its place
    with pytest.raises(NeuroprobeError, match="hash differs"):
        attach_recorded(subject, path)
    fresh(subject)


def test_atlas_links_features_to_neurons_through_the_decoder(bert, small_kinship, tmp_path):
    """A feature's page lists its decoder direction's top neurons; a neuron's page the features writing to it most."""
    from neuroprobe.atlas.build import build_atlas

    subject = fresh(bert)
    sae = random_sae(site_width(subject, small_kinship), 24, architecture="standard")
    attach(subject, load_sae(save_sae(sae, tmp_path / "sae", hook_name=SITE)))
    path = Recorder(subject, small_kinship, montage=SITE, quiet=True, batch_size=16).run(tmp_path / "r.h5")
    fresh(subject)
    build_atlas(path, tmp_path / "atlas", units="all")
    feature_pages = sorted((tmp_path / "atlas" / "units").glob("*sae*/*.html"))
    assert len(feature_pages) == 24
    d = sae.directions().numpy()
    page = (feature_pages[0].parent / "5.html").read_text()
    assert "Decoder direction: top neurons" in page
    top = int(np.argmax(np.abs(d[5])))
    assert f"{SITE} #{top}<" in page  # the neuron it writes to most, linked
    neuron = (tmp_path / "atlas" / "units" / feature_pages[0].parent.name.split("_sae")[0] / "3.html").read_text()
    assert "Top features writing to this neuron" in neuron
    assert f"{SITE}:sae #{int(np.argmax(np.abs(d[:, 3])))}<" in neuron


def test_exact_p_of_a_unit_silent_on_the_split_is_a_probability(tmp_path):
    """SAE features are often silent on a whole split: the exact p of such an all-tied unit is 1, never 1 + ulps
    (scipy's BH refused those, so concept_cells failed on feature sites)."""
    from neuroprobe import concept_cells
    from neuroprobe.analysis.exact import exact_p
    from neuroprobe.analysis.indices import midranks

    n = 137
    ranks, _ = midranks(np.zeros((1, n)))
    for m in range(2, 12):
        onehot = np.zeros((n, 1))
        onehot[:m, 0] = 1
        p, exact, _ = exact_p(ranks, onehot, np.array([[m * (n - m) / 2]]), np.array([[0.5]]), margin=1.0)
        assert exact[0, 0] and 0 < p[0, 0] <= 1.0
    stim = make_stimuli(10, 12, forms=(("text-name", "text"),))
    x = np.zeros((len(stim), 3), np.float32)
    x[(stim["concept"] == "c0").to_numpy() & (stim["split"] == "screening").to_numpy(), 0] = 5.0  # silent on testing
    x[:, 1] = np.random.default_rng(0).random(len(stim))
    write_recording(tmp_path / "r.h5", stim, {"site:sae": x})
    cells = concept_cells(tmp_path / "r.h5")
    assert len(cells) == 3 and cells["p_test"].dropna().le(1).all()
