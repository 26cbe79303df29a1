"""PPLM steering on a tiny random GPT-2 with a tiny byte-level BPE tokenizer."""
from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from scipy.special import rel_entr

from neuroprobe.errors import NeuroprobeError
from neuroprobe.steering import attributes as attrs
from neuroprobe.steering.pplm import (
    SMALL_CONST,
    BagTensors,
    PPLMHyperparameters,
    call_with_past,
    past_from_output,
    fuse,
    kl_term,
    perturb_past,
    steer,
    top_k_probs,
    window_mask,
)

BAG = ["planet", "galaxy", "moon", "star", "orbit"]
CORPUS = [
    "the cat sat on the mat and the dog ran to the house",
    "a planet orbits a star in the galaxy",
    "the moon and the star shine at night",
    "my mother and father went to the market",
    "orbit planet galaxy moon star",
] * 20


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


def _tiny_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPT2LMHeadModel(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


@pytest.fixture(scope="module")
def model(tok):
    return _tiny_gpt2(len(tok))


def _bag_ids(tok) -> list[int]:
    return [tok.encode(" " + w)[0] for w in BAG if len(tok.encode(" " + w)) == 1]


def _next_probs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)


def _word_mass(model, tok, ids: list[int], words: list[str]) -> float:
    """Σ over words of p(whole word | ids): the product of each piece's probability, each from a full
    (cache-free) forward pass of the context plus the pieces before it."""
    total = 0.0
    for word in words:
        pieces = tok.encode(" " + word, add_special_tokens=False)
        p = 1.0
        for i, piece in enumerate(pieces):
            p *= float(_next_probs(model, ids + pieces[:i])[piece])
        total += p
    return total


def _mlp_sites(prefix: str = "transformer."):
    from neuroprobe.subjects.base import Site

    return [Site(name=f"h.{i}.mlp", module=f"{prefix}h.{i}.mlp.c_proj", direction="input", kind="mlp")
            for i in range(2)]


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----------------------------------------------------------- steering with a bag
def test_bag_steering_raises_bag_mass(model, tok):
    result = steer(model, tok, "the cat", bag=BAG, length=20, seed=0)
    bag_ids = _bag_ids(tok)
    assert sorted(result.bag.token_ids) == sorted(bag_ids)
    steered = result.mass[result.mass["run"] == "steered"]
    unsteered = result.mass[result.mass["run"] == "unsteered"]
    assert len(steered) == len(unsteered) == 20
    # paired: at every step the steered distribution puts more mass on the bag than the
    # unperturbed model does at the same context
    assert (steered["bag_mass"].to_numpy() > steered["bag_mass_unpert"].to_numpy()).all()
    # and over the run, more than the unsteered run
    assert steered["bag_mass"].mean() > unsteered["bag_mass"].mean()
    assert result.mass_gain > 0


def test_recorded_mass_equals_direct_forward(model, tok):
    """The unsteered run's mass per step equals the whole-word probabilities of a teacher-forced forward of
    the same tokens (multi-token words as the product of their pieces)."""
    assert any(len(tok.encode(" " + w)) > 1 for w in BAG) and any(len(tok.encode(" " + w)) == 1 for w in BAG)
    result = steer(model, tok, "the cat", bag=BAG, length=6, seed=3)
    seq = list(result.prompt_ids)
    recorded = result.mass[result.mass["run"] == "unsteered"].sort_values("step")
    assert seq[0] == tok.bos_token_id
    for step, row in enumerate(recorded.itertuples()):
        assert row.bag_mass == pytest.approx(_word_mass(model, tok, seq, BAG), rel=1e-4)
        assert row.token_id == result.unsteered_ids[step]
        seq.append(result.unsteered_ids[step])
    # the steered run's unperturbed reference at step 0 is the prompt's distribution
    first = result.mass[(result.mass["run"] == "steered") & (result.mass["step"] == 0)].iloc[0]
    assert first["bag_mass_unpert"] == pytest.approx(_word_mass(model, tok, list(result.prompt_ids), BAG), rel=1e-4)
    # PPLM's single-token rule: only the single-token words count
    single = steer(model, tok, "the cat", bag=BAG, length=2, seed=3, multi_token=False)
    ids = torch.tensor(_bag_ids(tok))
    row = single.mass[single.mass["run"] == "unsteered"].iloc[0]
    assert row.bag_mass == pytest.approx(float(_next_probs(model, list(single.prompt_ids))[ids].sum()), rel=1e-4)


def test_deterministic_under_a_seed(model, tok):
    a = steer(model, tok, "the cat", bag=BAG, length=12, seed=7)
    b = steer(model, tok, "the cat", bag=BAG, length=12, seed=7)
    assert a.steered_ids == b.steered_ids and a.unsteered_ids == b.unsteered_ids
    pd.testing.assert_frame_equal(a.mass, b.mass)
    others = [steer(model, tok, "the cat", bag=BAG, length=12, seed=s).unsteered_ids for s in (8, 9)]
    assert any(o != a.unsteered_ids for o in others)


def test_zero_stepsize_reproduces_the_unsteered_run(model, tok):
    result = steer(model, tok, "the dog", bag=BAG, length=10, seed=1, stepsize=0.0)
    assert result.steered_ids == result.unsteered_ids
    m = result.mass
    np.testing.assert_allclose(m[m.run == "steered"]["bag_mass"].to_numpy(),
                               m[m.run == "unsteered"]["bag_mass"].to_numpy(), rtol=1e-5)


# ------------------------------------------------------ KL term and fusion (direct)
def test_kl_term_matches_direct_computation():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7))
    q = rng.dirichlet(np.ones(7))
    got = kl_term(torch.tensor(p), torch.tensor(q), 0.01)
    assert float(got) == pytest.approx(0.01 * rel_entr(p, q).sum(), rel=1e-10)
    # zeros are lifted to SMALL_CONST on both sides before the logarithm
    p0 = np.array([0.5, 0.5, 0.0])
    q0 = np.array([0.25, 0.0, 0.75])
    pc = np.where(p0 <= SMALL_CONST, p0 + SMALL_CONST, p0)
    qc = np.where(q0 <= SMALL_CONST, q0 + SMALL_CONST, q0)
    direct = 2.0 * np.sum(pc * np.log(pc / qc))
    assert float(kl_term(torch.tensor(p0), torch.tensor(q0), 2.0)) == pytest.approx(direct, rel=1e-10)
    # its gradient w.r.t. logits is the analytic one: p ⊙ (log(p/q) − KL)
    logits = torch.tensor(rng.normal(size=7), requires_grad=True)
    probs = torch.softmax(logits, -1)
    (grad,) = torch.autograd.grad(kl_term(probs, torch.tensor(q), 1.0), logits)
    pp = torch.softmax(logits.detach(), -1).numpy()
    kl = np.sum(pp * np.log(pp / q))
    np.testing.assert_allclose(grad.numpy(), pp * (np.log(pp / q) - kl), rtol=1e-8, atol=1e-12)


def test_fusion_and_top_k_match_direct_computation():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(9))
    q = rng.dirichlet(np.ones(9))
    for gm in (0.0, 0.5, 0.9, 1.0):
        direct = p**gm * q ** (1 - gm)
        direct /= direct.sum()
        np.testing.assert_allclose(fuse(torch.tensor(p), torch.tensor(q), gm).numpy(), direct, rtol=1e-12)
    fused = p**0.9 * q**0.1
    fused /= fused.sum()
    keep = np.argsort(fused)[::-1][:3]
    direct = np.zeros_like(fused)
    direct[keep] = fused[keep]
    direct /= direct.sum()
    np.testing.assert_allclose(top_k_probs(torch.tensor(fused), 3).numpy(), direct, rtol=1e-12)
    np.testing.assert_allclose(top_k_probs(torch.tensor(fused), 0).numpy(), fused, rtol=1e-12)


def test_window_mask():
    assert window_mask(5, 0, False).tolist() == [1, 1, 1, 1, 1]
    assert window_mask(5, 2, False).tolist() == [0, 0, 0, 1, 1]
    assert window_mask(5, 2, True).tolist() == [0, 0, 0, 0.5, 1]
    assert window_mask(2, 4, True).tolist() == [1, 1]


def test_perturbation_step_matches_direct_gradient(model, tok):
    """Two PPLM iterations (bag + KL, window with decay) against a direct autograd computation."""
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        ids = torch.tensor([[tok.bos_token_id] + tok.encode("the cat sat on the")])
        bag = torch.tensor(_bag_ids(tok))
        with torch.no_grad():
            past = past_from_output(call_with_past(model, [], input_ids=ids[:, :-1]))
            q = F.softmax(model(ids).logits[:, -1], -1)
        hp = PPLMHyperparameters(num_iterations=2, stepsize=0.05, gamma=1.5, kl_scale=0.5, window_length=3, decay=True)
        got, norms, _ = perturb_past(model, past, ids[:, -1:], q, hp, bag_ids=bag)

        T = past[0][0].shape[-2]
        mask = torch.zeros(T)
        mask[-3:] = torch.tensor([1 / 3, 2 / 3, 1.0])
        mask = mask.view(1, 1, T, 1)
        delta = [torch.zeros_like(torch.stack([k, v])) for k, v in past]
        prev = None
        for _ in range(2):
            leaves = [d.clone().requires_grad_(True) for d in delta]
            shifted = [(k + d[0], v + d[1]) for (k, v), d in zip(past, leaves)]
            probs = F.softmax(call_with_past(model, shifted, input_ids=ids[:, -1:]).logits[:, -1], -1)
            loss = -torch.log(probs[0, bag].sum()) + 0.5 * (probs * torch.log(probs / q)).sum()
            grads = torch.autograd.grad(loss, leaves)
            n = [torch.linalg.vector_norm(g * mask) + SMALL_CONST for g in grads]
            if prev is not None:  # bag-only PPLM keeps the largest norm seen so far
                n = [torch.maximum(a, b) for a, b in zip(prev, n)]
            prev = n
            delta = [d - 0.05 * g * mask / ni**1.5 for d, g, ni in zip(delta, grads, n)]
        for (dk, dv), d in zip(got, delta):
            torch.testing.assert_close(dk, d[0], rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(dv, d[1], rtol=1e-4, atol=1e-7)
            assert float(d[0][..., : T - 3, :].abs().max()) == 0.0  # outside the window: untouched
        torch.testing.assert_close(torch.stack(norms), torch.stack(prev))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


# ---------------------------------------------------------------- discriminator
def _tiny_head(scale: float = 5.0) -> attrs.ClassificationHead:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(1)
    try:
        head = attrs.ClassificationHead(3, 32)
    finally:
        torch.random.set_rng_state(gen_state)
    with torch.no_grad():
        head.mlp.weight.mul_(scale)
    return head


def test_discriminator_steering_raises_class_probability(model, tok, tmp_path):
    head = _tiny_head()
    path = tmp_path / "tiny_head.pt"
    torch.save(head.state_dict(), path)

    def class_prob(ids: list[int]) -> float:
        with torch.no_grad():
            h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1].mean(1)
            return float(torch.softmax(head(h), -1)[0, 1])

    steered, unsteered = [], []
    for seed in range(4):
        r = steer(model, tok, "the cat", discriminator=str(path), class_label=1, length=10, seed=seed, stepsize=0.05)
        assert r.discriminator == "tiny_head" and r.class_id == 1
        steered.append(class_prob(r.prompt_ids + r.steered_ids))
        unsteered.append(class_prob(r.prompt_ids + r.unsteered_ids))
    assert np.mean(steered) > np.mean(unsteered)


def test_discriminator_perturbation_lowers_the_discriminator_loss(model, tok):
    """The loss computed directly (mean hidden state with a soft next token) falls after the perturbation."""
    head = _tiny_head()
    ids = torch.tensor([[tok.bos_token_id] + tok.encode("the cat sat on")])
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        first = call_with_past(model, [], input_ids=ids[:, :-1], output_hidden_states=True)
        past = past_from_output(first)
        hidden_sum = first.hidden_states[-1].sum(1)
        whole = call_with_past(model, [], input_ids=ids)
        full = past_from_output(whole)
        q = F.softmax(whole.logits[:, -1], -1)

    def direct_loss(delta) -> float:
        with torch.no_grad():
            shifted = [(k + dk, v + dv) for (k, v), (dk, dv) in zip(past, delta)]
            out = call_with_past(model, shifted, input_ids=ids[:, -1:], output_hidden_states=True)
            probs = F.softmax(out.logits[:, -1], -1)
            soft = (probs @ emb).unsqueeze(1)
            fut = call_with_past(model, full, inputs_embeds=soft, output_hidden_states=True)
            mean = (hidden_sum + out.hidden_states[-1][:, -1] + fut.hidden_states[-1][:, -1]) / (ids.shape[1] + 1)
            return float(F.cross_entropy(head(mean), torch.tensor([1])))

    zero = [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in past]
    delta, _, _ = perturb_past(model, past, ids[:, -1:], q, PPLMHyperparameters(kl_scale=0.0), head=head,
                               class_id=1, unpert_past_full=full, hidden_sum=hidden_sum, n_tokens=ids.shape[1])
    assert direct_loss(delta) < direct_loss(zero)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------ gradients stay local
@pytest.mark.parametrize("ctx", ["none", "no_grad", "inference_mode", "enable_grad"])
def test_gradients_stay_local(model, tok, ctx):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)  # a mixed state must come back as it was
    flags["transformer.h.0.mlp.c_fc.weight"] = False
    model.train()  # dropout on: steering must switch it off and then restore the mode
    threads = torch.get_num_threads()
    context = {"none": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
               "enable_grad": torch.enable_grad}[ctx]
    try:
        with context():
            grad_mode, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
            a = steer(model, tok, "the cat", bag=BAG, length=5, seed=0)
            steer(model, tok, "the cat", bag=BAG, discriminator=_tiny_head(), class_label=2, length=3, seed=0)
            assert torch.is_grad_enabled() == grad_mode
            assert torch.is_inference_mode_enabled() == inference
        assert torch.get_num_threads() == threads
        assert model.training and all(m.training for m in model.modules())
        for name, p in model.named_parameters():
            assert p.grad is None, name
            assert p.requires_grad == flags[name], name
            assert torch.equal(p.detach(), before[name]), name
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    model.eval()
    b = steer(model, tok, "the cat", bag=BAG, length=5, seed=0)
    assert a.steered_ids == b.steered_ids  # dropout was off during the train-mode call


# --------------------------------------------------------------- with electrodes
def test_steering_under_recording_and_lesion(model, tok):
    from neuroprobe.electrodes import Electrodes

    sites = _mlp_sites()
    baseline = _n_hooks(model)  # transformers keeps a few hooks of its own
    plain = steer(model, tok, "the cat", bag=BAG, length=6, seed=2)

    # recording: electrodes read while steering; steering adds no hook of its own
    hooks_seen: list[int] = []
    with Electrodes(model, sites) as el:
        n_electrode_hooks = _n_hooks(model)
        recorded = steer(model, tok, "the cat", bag=BAG, length=6, seed=2,
                         on_forward=lambda phase: hooks_seen.append(_n_hooks(model)))
    assert n_electrode_hooks > baseline and set(hooks_seen) == {n_electrode_hooks}
    assert set(el.data) == {"h.0.mlp", "h.1.mlp"} and el.data["h.0.mlp"].shape == (1, 1, 128)
    assert recorded.steered_ids == plain.steered_ids and recorded.unsteered_ids == plain.unsteered_ids
    assert _n_hooks(model) == baseline

    # an identity edit changes nothing
    with Electrodes(model, sites, read=False, edits={"h.0.mlp": lambda x, s: x * 1.0}):
        same = steer(model, tok, "the cat", bag=BAG, length=6, seed=2)
    pd.testing.assert_frame_equal(same.mass, plain.mass)

    # a lesion (all MLP units of layer 0 silenced): the run samples from the lesioned subject
    def silence(x, site):
        return torch.zeros_like(x)

    with Electrodes(model, sites, read=False, edits={"h.0.mlp": silence}):
        lesioned = steer(model, tok, "the cat", bag=BAG, length=6, seed=2)
        direct = _word_mass(model, tok, lesioned.prompt_ids, BAG)
    intact = _word_mass(model, tok, lesioned.prompt_ids, BAG)
    m = lesioned.mass
    first = m[(m.run == "unsteered") & (m.step == 0)]["bag_mass"].iloc[0]
    assert first == pytest.approx(direct, rel=1e-4)
    assert abs(direct - intact) > 1e-6
    s = m[m.run == "steered"]
    assert (s["bag_mass"] > s["bag_mass_unpert"]).all()  # steering still pushes under the lesion
    assert _n_hooks(model) == baseline


# ---------------------------------------------------------------- attribute data
def test_packaged_bags_and_licence():
    names = attrs.available_bags()
    for expected in ("space", "military", "kinship", "animals", "colours"):
        assert expected in names
    assert (attrs.DATA_DIR / "LICENSE").read_text().lstrip().startswith("Apache License")
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "pplm" / "wordlists"
    for name in ("kinship", "animals", "colours"):
        words = attrs.read_words(attrs.bag_path(name))
        assert len(words) >= 20 and len(set(words)) == len(words)
        assert all(" " not in w and w == w.lower() for w in words)
    if shared.is_dir():  # the packaged copy is the published data, byte for byte
        for f in shared.glob("*.txt"):
            assert (attrs.DATA_DIR / "wordlists" / f.name).read_bytes() == f.read_bytes()


def test_bag_words_single_and_multi_token(tok, tmp_path):
    words = BAG + ["xylophonic", "mother", "zebra crossing", "planet"]
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(words) + "\n\n")
    bag = attrs.load_bag(str(path), tok)
    assert bag.name == "mine" and list(bag.words) == words[:-1]  # the repeated word counts once
    assert [list(p) for p in bag.pieces] == [tok.encode(" " + w, add_special_tokens=False) for w in words[:-1]]
    single = [w for w in words[:-1] if len(tok.encode(" " + w, add_special_tokens=False)) == 1]
    assert list(bag.token_ids) == [tok.encode(" " + w)[0] for w in single]
    assert set(bag.multi_token_words) == set(words[:-1]) - set(single) and "xylophonic" in bag.multi_token_words
    assert bag.dropped == ()
    # PPLM's rule drops the multi-token words, naming each with its token count
    strict = attrs.load_bag(str(path), tok, multi_token=False)
    assert list(strict.words) == single
    assert set(strict.dropped_words) == set(bag.multi_token_words)
    assert any(d.startswith("xylophonic (") and "tokens)" in d for d in strict.dropped)
    assert "dropped" in strict.describe() and "xylophonic" in strict.describe()
    with pytest.raises(NeuroprobeError):
        attrs.load_bag("no-such-bag", tok)
    with pytest.raises(NeuroprobeError, match="xylophonic"):
        attrs.bag_from_words(["xylophonic"], tok, multi_token=False)


def test_packaged_discriminators():
    sentiment = attrs.load_discriminator("sentiment")
    assert (sentiment.head.class_size, sentiment.head.embed_size) == (5, 1024)
    assert sentiment.class_id("very_positive") == 2 and sentiment.class_id("very_negative") == 3
    assert sentiment.class_id(None) == 3 and sentiment.class_id("2") == 2
    with pytest.raises(NeuroprobeError):
        sentiment.class_id(0)
    with pytest.raises(NeuroprobeError):
        sentiment.class_id("happy")
    clickbait = attrs.load_discriminator("clickbait")
    assert clickbait.head.class_size == 2 and clickbait.class_id("clickbait") == 1
    raw = torch.load(attrs.DISCRIMINATOR_DIR / "clickbait_classifierhead.pt", map_location="cpu", weights_only=True)
    x = torch.randn(4, 1024)
    torch.testing.assert_close(clickbait.head(x), x @ raw["mlp.weight"].T + raw["mlp.bias"])
    assert not any(p.requires_grad for p in clickbait.head.parameters())


def test_user_errors(model, tok, tmp_path):
    with pytest.raises(NeuroprobeError, match="wide"):
        steer(model, tok, "the cat", discriminator="sentiment", length=2)  # a GPT-2-medium head on a tiny model
    with pytest.raises(NeuroprobeError):
        steer(model, tok, "the cat", length=2)
    with pytest.raises(NeuroprobeError, match="unknown PPLM hyperparameter"):
        steer(model, tok, "the cat", bag=BAG, length=2, step_size=0.1)
    with pytest.raises(NeuroprobeError):
        steer(model, tok, "the cat", bag=BAG, length=2, gm_scale=1.5)
    bad = tmp_path / "bad.pt"
    torch.save({"weight": torch.zeros(2, 32)}, bad)
    with pytest.raises(NeuroprobeError):
        attrs.load_discriminator(str(bad))


# -------------------------------------------------------------------- analysis
@pytest.fixture()
def subject(model, tok):
    sites = {s.name: s for s in _mlp_sites(prefix="")}
    return SimpleNamespace(
        name="tiny", model=model.transformer, head_model=model, tokenizer=tok,
        sites=lambda names: list(sites.values()) if names == "all" else [sites[n] for n in names],
    )


@pytest.fixture()
def cells():
    space = {("h.0.mlp", 3), ("h.1.mlp", 3), ("h.1.mlp", 17), ("h.1.mlp", 40)}
    kinship = {("h.0.mlp", 5), ("h.1.mlp", 5), ("h.1.mlp", 9)}
    rows = []
    for layer in range(2):
        for unit in range(128):
            key = (f"h.{layer}.mlp", unit)
            rows.append({"site": key[0], "unit": unit, "concept": "space" if key in space else "kinship",
                         "is_cell": key in space or key in kinship})
    return pd.DataFrame(rows)


def test_cell_responses_match_a_teacher_forced_recording(subject, cells, model, tok):
    from neuroprobe.electrodes import Electrodes
    from neuroprobe.steering.analysis import steering_cell_responses

    responses = steering_cell_responses(subject, cells, "space", ["the cat"], bag=BAG, length=5, seeds=(4,))
    chosen = cells[cells.is_cell]
    assert len(responses) == 2 * len(chosen)
    assert set(responses.loc[responses.is_target, "unit"]) == {3, 17, 40}
    plain = steer(model, tok, "the cat", bag=BAG, length=5, seed=4)
    seq = plain.prompt_ids + plain.unsteered_ids[:-1]
    with Electrodes(model.transformer, _mlp_sites(prefix="")) as el:
        with torch.no_grad():
            model(torch.tensor([seq]))
    positions = list(range(len(plain.prompt_ids) - 1, len(seq)))
    for row in responses[responses.run == "unsteered"].itertuples():
        direct = float(el.data[row.site][0, positions, row.unit].mean())
        assert row.response == pytest.approx(direct, rel=1e-4, abs=1e-6)


def test_lesion_steering_and_figure(subject, cells, model, tok):
    import matplotlib

    matplotlib.use("Agg")
    from neuroprobe.steering.analysis import lesion_steering, plot_steering, steering_cell_responses, steering_summary

    lesions = lesion_steering(subject, cells, "space", ["the cat"], bag=BAG, length=4, seeds=(0,), random_draws=2)
    assert list(lesions.condition) == ["intact", "lesion", "random", "random"]
    assert list(lesions.n_units) == [0, 4, 4, 4]
    intact = steer(model, tok, "the cat", bag=BAG, length=4, seed=0)
    assert lesions.gain.iloc[0] == pytest.approx(intact.mass_gain, rel=1e-6)
    assert lesions.gain.iloc[1] != pytest.approx(intact.mass_gain, rel=1e-9)
    responses = steering_cell_responses(subject, cells, "space", ["the cat"], bag=BAG, length=3)
    summary = steering_summary(responses, lesions)
    target = summary[summary.what == "target cells"].iloc[0]
    t = responses[responses.is_target]
    assert target.change == pytest.approx(t[t.run == "steered"].response.mean() - t[t.run == "unsteered"].response.mean())
    fig = plot_steering(responses, lesions)
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt

    plt.close(fig)
    with pytest.raises(NeuroprobeError):
        lesion_steering(subject, cells, "colours", ["the cat"], bag=BAG, length=2)


# ------------------------------------------------------------------------- CLI
def test_steer_command_loads_a_local_checkpoint(model, tok, tmp_path):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    registry = pytest.importorskip("neuroprobe.subjects")
    if not hasattr(registry, "load_subject"):
        pytest.skip("subject registry not available")
    from neuroprobe.steering.commands import register

    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    bag = tmp_path / "space.txt"
    bag.write_text("\n".join(BAG) + "\n")
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # keep `steer` a subcommand
    out = tmp_path / "mass.csv"
    res = CliRunner().invoke(app, ["steer", "--model", "pplm", "--weights", str(tmp_path / "tiny"), "--bag", str(bag),
                                   "--prompt", "the cat", "--length", "5", "--device", "cpu", "--quiet",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "= steered =" in res.output and "= unsteered =" in res.output and "bag space" in res.output
    assert "multi-token" in res.output
    table = pd.read_csv(out)
    assert len(table) == 10 and set(table.run) == {"steered", "unsteered"}
    res = CliRunner().invoke(app, ["steer", "--model", "pplm", "--weights", str(tmp_path / "tiny"),
                                   "--prompt", "the cat"])
    assert isinstance(res.exception, NeuroprobeError)


# ------------------------------------------------ Korean: multi-token words, several bags
KOREAN_CORPUS = [
    "우주 에는 행성 과 은하 가 있다",
    "밤 하늘 에 달 과 별 이 빛난다",
    "어머니 와 아버지 는 시장 에 갔다",
    "고양이 가 집 에서 잔다",
    "the planet and the moon",
] * 20
KOREAN_SPACE = ["우주", "행성", "은하", "달", "별"]
KOREAN_FAMILY = ["어머니", "아버지", "할머니"]


@pytest.fixture(scope="module")
def ko_tok():
    """A tiny byte-level BPE that covers Hangul (every byte is in its alphabet; a few syllables are merged)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(KOREAN_CORPUS, vocab_size=320, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def ko_model(ko_tok):
    return _tiny_gpt2(len(ko_tok), seed=2)


def test_korean_bag_steering_raises_the_whole_word_mass(ko_model, ko_tok):
    bag = attrs.bag_from_words(KOREAN_SPACE, ko_tok, name="우주")
    assert bag.dropped == () and len(bag) == len(KOREAN_SPACE)
    assert len(bag.multi_token_words) >= 3  # most Korean words are several byte-level pieces here
    steered, unsteered = [], []
    for seed in range(3):
        r = steer(ko_model, ko_tok, "밤 하늘 에", bag=bag, length=8, seed=seed, stepsize=0.05)
        s = r.mass[r.mass["run"] == "steered"]
        assert (s["bag_mass"] > s["bag_mass_unpert"]).mean() > 0.5
        means = r.mean_mass()
        steered.append(means["steered"])
        unsteered.append(means["unsteered"])
    assert np.mean(steered) > 1.2 * np.mean(unsteered)


def test_several_bags_at_once(ko_model, ko_tok):
    space = attrs.bag_from_words(KOREAN_SPACE, ko_tok, name="space")
    family = attrs.bag_from_words(KOREAN_FAMILY, ko_tok, name="family")
    r = steer(ko_model, ko_tok, "밤 하늘 에", bag=space, bags=[family], length=4, seed=0)
    assert [b.name for b in r.bags] == ["space", "family"] and r.bag is space
    u = r.mass[r.mass["run"] == "unsteered"].sort_values("step")
    seq = list(r.prompt_ids)
    for step, row in enumerate(u.itertuples()):
        a = _word_mass(ko_model, ko_tok, seq, KOREAN_SPACE)
        b = _word_mass(ko_model, ko_tok, seq, KOREAN_FAMILY)
        assert u.iloc[step]["bag_mass[space]"] == pytest.approx(a, rel=1e-4)
        assert u.iloc[step]["bag_mass[family]"] == pytest.approx(b, rel=1e-4)
        assert row.bag_mass == pytest.approx(a + b, rel=1e-4)  # disjoint bags: the union is the sum
        seq.append(r.unsteered_ids[step])
    counts = r.word_counts()
    assert list(counts.columns) == ["space", "family"] and set(counts.index) == {"steered", "unsteered"}


def test_bag_loss_over_words_matches_direct_autograd(ko_model, ko_tok):
    """The multi-bag, multi-token loss and its gradient equal a direct computation with full forwards."""
    bags = [attrs.bag_from_words(KOREAN_SPACE, ko_tok, name="a"), attrs.bag_from_words(KOREAN_FAMILY, ko_tok, name="b")]
    table = BagTensors.build(bags)
    ids = [ko_tok.bos_token_id] + ko_tok.encode("밤 하늘 에")
    for p in ko_model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            past = past_from_output(call_with_past(ko_model, [], input_ids=torch.tensor([ids[:-1]])))
        leaves = [(torch.zeros_like(k).requires_grad_(True), torch.zeros_like(v)) for k, v in past]
        shifted = [(k + dk, v + dv) for (k, v), (dk, dv) in zip(past, leaves)]
        out = call_with_past(ko_model, shifted, input_ids=torch.tensor([ids[-1:]]))
        got = table.loss(ko_model, past_from_output(out), F.softmax(out.logits[:, -1], -1))
        g_got = torch.autograd.grad(got, [leaves[0][0]])[0]

        # direct: each word's pieces appended to the context, one cache-free forward per word
        shifted = [(k + dk, v + dv) for (k, v), (dk, dv) in zip(past, leaves)]
        want = 0.0
        for bag in bags:
            mass = 0.0
            for pieces in bag.pieces:
                logits = call_with_past(ko_model, shifted, input_ids=torch.tensor([[ids[-1], *pieces[:-1]]])).logits[0]
                mass = mass + F.log_softmax(logits, -1)[torch.arange(len(pieces)), torch.tensor(pieces)].sum().exp()
            want = want - torch.log(mass)
        g_want = torch.autograd.grad(want, [leaves[0][0]])[0]
    finally:
        for p in ko_model.parameters():
            p.requires_grad_(True)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-9)


def test_words_a_tokenizer_cannot_spell_are_named():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "planet": 1, "moon": 2, "star": 3}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]")
    bag = attrs.bag_from_words(["planet", "행성", "moon", "달"], tok, name="mixed")
    assert list(bag.words) == ["planet", "moon"]
    assert bag.dropped_words == ("행성", "달") and "행성 (not spelt by this tokenizer)" in bag.dropped
    with pytest.raises(NeuroprobeError, match="행성"):
        attrs.bag_from_words(["행성", "달"], tok, name="ko")


def test_steer_checks_bags_before_loading_the_model(model, tok, tmp_path, monkeypatch):
    typer = pytest.importorskip("typer")
    from typer.testing import CliRunner

    import neuroprobe.subjects as subjects
    from neuroprobe.steering.commands import register

    model.save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bag was checked")

    monkeypatch.setattr(subjects, "load_subject", no_load)
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    multi = tmp_path / "multi.txt"
    multi.write_text("xylophonic\n")
    for bag, extra, needle in ((empty, [], "holds no word"), (multi, ["--single-token-only"], "xylophonic (")):
        res = CliRunner().invoke(app, ["steer", "--model", "pplm", "--weights", str(tmp_path / "tiny"), "--bag", str(bag),
                                       "--prompt", "the cat", "--quiet", *extra])
        assert isinstance(res.exception, NeuroprobeError) and needle in str(res.exception)


@pytest.mark.slow
def test_steer_cli_is_quiet_and_uses_the_cache_api(ko_model, ko_tok, tmp_path):
    """`neuroprobe steer -q` with two Korean bags: no progress bar, no deprecation warning, dropped words named."""
    import os
    import subprocess
    import sys

    ko_model.save_pretrained(tmp_path / "ko")
    ko_tok.save_pretrained(tmp_path / "ko")
    (tmp_path / "space.txt").write_text("\n".join(KOREAN_SPACE) + "\n", encoding="utf-8")
    (tmp_path / "family.txt").write_text("\n".join(KOREAN_FAMILY) + "\n", encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    res = subprocess.run([sys.executable, "-m", "neuroprobe.cli", "steer", "--model", "pplm", "--weights",
                          str(tmp_path / "ko"), "--bag", str(tmp_path / "space.txt"), "--bag", str(tmp_path / "family.txt"),
                          "--prompt", "밤 하늘 에", "--length", "3", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Loading weights" not in res.stderr and "past_key_values" not in res.stderr and "%|" not in res.stderr
    assert "bag space: 5 words" in res.stdout and "bag family: 3 words" in res.stdout
    assert "  space: unsteered" in res.stdout and "  family: unsteered" in res.stdout
