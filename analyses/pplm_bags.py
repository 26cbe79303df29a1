"""PPLM with an English and a Korean bag of words: bag probability mass and perplexity against step size and iterations.

Reproduces the trade-off of Dathathri et al. 2020 (ICLR, "Plug and Play Language
Models"): steering GPT-2 toward a bag of words raises the probability the model puts on
the bag's words, and the more it is pushed (larger step size α, more gradient
iterations per token) the more it costs in fluency (perplexity of the generated text
under the unsteered model).  Here the bags are the project's kinship words in English
(``kinship``: one GPT-2 token each) and in Korean (``kinship_ko``: GPT-2's byte-level BPE
spells each Korean word as 3-9 byte tokens, so its whole-word mass is a product of
many small probabilities).  The unsteered continuation of the same prompt and seed is
the baseline (α = 0).

The real subject is ``--model pplm`` (GPT-2 medium, 355M parameters).  Without its
weights, ``--init auto`` runs its untrained twin: GPT-2 medium's architecture with random
weights (``init="random"``) and GPT-2's real tokenizer (shipped with neuroprobe).  That
run shows the mechanics of steering only — its masses and perplexities say nothing
about language — and ``results.md`` says so.  ``--quick`` runs a tiny GPT-2
(``neuroprobe.testing.make_tiny``: 2 layers, hidden size 32, its own small BPE).

    python analyses/pplm_bags.py [--model pplm] [--init auto] [--stepsizes 0.01,0.03,0.1] [--iterations 1,3]
"""
from __future__ import annotations

import argparse
import time

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from neuroprobe.errors import NeuroprobeError  # noqa: E402
from neuroprobe.experiments import Report, experiment_args  # noqa: E402
from neuroprobe.experiments.cli import run_main  # noqa: E402

NAME = "pplm_bags"
QUESTION = ("Does PPLM steering toward a bag of words (English and Korean kinship words) raise the bag's probability "
            "mass, and at what cost in perplexity, as the step size and the number of iterations grow?")
PUBLISHED = ("Dathathri et al. 2020 (ICLR), GPT-2 medium with seven topic bags (Table 4): PPLM's bag-of-words "
             "steering made samples judged on topic several times as often as the unsteered GPT-2, at a modest rise "
             "in perplexity; Sec. 4 and the authors' README: a larger step size strengthens the topic and degrades "
             "fluency (α = 0 recovers GPT-2). Their numbers come from GPT-2 medium's trained weights; none is "
             "re-measured here unless --model pplm runs with them.")


def _options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--init", choices=("auto", "pretrained", "random"), default="auto",
                    help="pretrained weights, the untrained twin, or auto: pretrained when its weights are here")
    ap.add_argument("--weights", default=None, metavar="DIR",
                    help="a local folder with the subject's checkpoint (its config, tokenizer and weights)")
    ap.add_argument("--scale", choices=("real", "tiny"), default=None,
                    help="size of an untrained subject: real (the published shape) or tiny (make_tiny); "
                         "default real, tiny with --quick")
    ap.add_argument("--bag", action="append", default=None,
                    help="bag of words (packaged name or file); repeat; default kinship and kinship_ko")
    ap.add_argument("--prompt", action="append", default=None,
                    help="prompt to continue; repeat; default 'The lake' and 'The potato' (PPLM's prompts)")
    ap.add_argument("--stepsizes", default=None, help="step sizes α > 0, comma-separated (default 0.01,0.03,0.1)")
    ap.add_argument("--iterations", default=None, help="gradient iterations per token, comma-separated (default 1,3)")
    ap.add_argument("--length", type=int, default=None, help="tokens generated per continuation (default 8)")
    ap.add_argument("--multi-token-grid", choices=("reduced", "full"), default="reduced",
                    help="for bags of multi-token words (Korean under GPT-2: a teacher-forced pass over the words at "
                         "every step and iteration, ~8x the cost): reduced = first prompt, fewest iterations and the "
                         "two largest step sizes only")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: least CPU time)")


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise NeuroprobeError(f"--{what} takes comma-separated numbers, not {text!r}.") from None
    if not values:
        raise NeuroprobeError(f"--{what} needs at least one value.")
    return values


def _subject(args: argparse.Namespace):
    """The subject to steer and a sentence saying exactly what it is."""
    from neuroprobe.experiments.twins import subject_status, untrained_twin
    from neuroprobe.subjects.registry import get_spec, load_subject

    spec = get_spec(args.model)
    init = args.init
    if init == "auto":
        here = args.weights is not None or args.model.startswith("hf:") or subject_status(args.model).pretrained
        init = "pretrained" if here else "random"
    if init == "pretrained":
        if args.scale == "tiny":
            raise NeuroprobeError("--scale tiny is for the untrained twin; pass --init random with it.")
        subject = load_subject(args.model, weights=args.weights, heads=True, device=args.device, quiet=True)
        what = (f"{spec.name} ({args.weights or spec.checkpoint}"
                f"{'' if args.weights else f', {spec.params} parameters'}), pretrained weights")
        return subject, what, False
    scale = args.scale or ("tiny" if args.quick else "real")
    subject = untrained_twin(args.model, scale=scale, seed=args.seed, device=args.device, cache=args.cache, heads=True)
    if scale == "tiny":
        what = (f"a tiny GPT-2-architecture twin of {spec.name} (neuroprobe.testing.make_tiny: 2 layers, hidden size 32, "
                f"a {len(subject.tokenizer)}-token BPE trained on a small corpus), random weights (seed {args.seed})")
    else:
        what = (f"{spec.name}'s untrained twin: {spec.checkpoint}'s architecture at real size ({spec.params} parameters) "
                f"with random weights (init='random', seed {args.seed}) and the checkpoint's own tokenizer "
                f"({subject.provenance_notes.get('tokenizer_source', 'its tokenizer')})")
    return subject, what, True


def _plot(table: pd.DataFrame, bags: list):
    """Rows: bags; left: bag mass relative to the unsteered run; right: perplexity; one line per iteration count."""
    import seaborn as sns

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7,
                         "ytick.labelsize": 7, "legend.fontsize": 7})
    fig, axes = plt.subplots(len(bags), 2, figsize=(3.5, 1.7 * len(bags) + 0.45), squeeze=False)
    iters = sorted(table.loc[table["run"] == "steered", "num_iterations"].unique())
    colours = dict(zip(iters, sns.color_palette("viridis", max(2, len(iters)))[: len(iters)]))
    steps = sorted(table.loc[table["run"] == "steered", "stepsize"].unique())
    for r, bag in enumerate(bags):
        part = table[table["bag"] == bag.name]
        base = part[part["run"] == "unsteered"].set_index("prompt")
        rel = part.assign(mass=part["mass"] / part["prompt"].map(base["mass"]))  # per prompt, ÷ its unsteered run
        for c, (measure, label) in enumerate((("mass", "bag mass ÷ unsteered\nbag mass (×)"),
                                              ("perplexity", "perplexity under the\nunsteered model"))):
            ax = axes[r, c]
            level = 1.0 if measure == "mass" else float(base[measure].mean())
            ax.axhline(level, color="0.4", ls="--", lw=1, label="unsteered (α = 0)")
            for k in iters:
                run = rel[(rel["run"] == "steered") & (rel["num_iterations"] == k)]
                if run.empty:
                    continue
                mean = run.groupby("stepsize")[measure].mean()
                ax.plot(mean.index, mean.values, "-o", ms=3, lw=1.2, color=colours[k],
                        label=f"steered, {k} iteration{'s' if k > 1 else ''}")
                if run["prompt"].nunique() > 1:
                    ax.scatter(run["stepsize"], run[measure], s=6, color=colours[k], alpha=0.45, lw=0)
            ax.set_xscale("log")
            ax.set_xticks(steps)
            ax.set_xticklabels([f"{s:g}" for s in steps])
            ax.minorticks_off()
            if measure == "mass":
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_ylabel(label)
            ax.set_xlabel("step size α" if r == len(bags) - 1 else "")
        axes[r, 0].set_title(f"{bag.name}: {'Korean' if _korean(bag) else 'English'}, {len(bag)} words; unsteered "
                             f"mass {_sci(base['mass'].mean())}", loc="left")
    handles, labels = [], []
    for ax in axes.ravel():
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) > 2), 1, 1))
    return fig


def _korean(bag) -> bool:
    """Whether the bag's words are written in Hangul."""
    return any("\uac00" <= ch <= "\ud7a3" for w in bag.words for ch in w)


def _sci(x: float) -> str:
    return f"{x:.2e}"


def main() -> None:
    args = experiment_args(NAME, __doc__, model="pplm", add=_options)
    import torch

    from neuroprobe.steering.analysis import steering_tradeoff
    from neuroprobe.steering.pplm import language_model, resolve_bags

    torch.set_num_threads(max(1, args.threads))
    stepsizes = _floats(args.stepsizes or ("0.03,0.1" if args.quick else "0.01,0.03,0.1"), "stepsizes")
    iterations = [int(k) for k in _floats(args.iterations or ("1" if args.quick else "1,3"), "iterations")]
    if any(a <= 0 for a in stepsizes) or any(k < 1 for k in iterations):
        raise NeuroprobeError("--stepsizes must be > 0 and --iterations >= 1 (the unsteered baseline is always run).")
    length = args.length or (4 if args.quick else 8)
    if length < 1:
        raise NeuroprobeError(f"--length must be at least 1 token, not {length}.")
    prompts = args.prompt or (["The lake"] if args.quick else ["The lake", "The potato"])
    t0 = time.perf_counter()
    rep = Report(NAME, args.out, QUESTION, args=args)  # its clock covers the model's loading too
    subject, what, untrained = _subject(args)
    language_model(subject)  # a subject that is not a causal LM ends here, in one sentence
    bags = resolve_bags(None, args.bag or ["kinship", "kinship_ko"], subject.tokenizer)
    frames = []
    for bag in bags:
        multi = len(bag.multi_token_words) > len(bag) / 2
        reduced = multi and args.multi_token_grid == "reduced"
        grid = dict(prompts=prompts[:1] if reduced else prompts,
                    iterations=[min(iterations)] if reduced else iterations,
                    stepsizes=sorted(stepsizes)[-2:] if reduced else stepsizes)
        if not args.quiet:
            print(f"[{time.perf_counter() - t0:5.0f}s] {bag.describe()}; {len(grid['prompts'])} prompt(s) x "
                  f"{len(grid['stepsizes'])} step sizes x {len(grid['iterations'])} iteration count(s)", flush=True)
        frames.append(steering_tradeoff(subject, bag, grid["prompts"], stepsizes=grid["stepsizes"],
                                        iterations=grid["iterations"], length=length, seed=args.seed)
                      .assign(grid="reduced" if reduced else "full", words=len(bag),
                              multi_token_words=len(bag.multi_token_words)))
    table = pd.concat(frames, ignore_index=True)
    rep.table(table, "tradeoff")
    for r in table.itertuples(index=False):
        common = dict(condition=r.run, site=r.bag, concept=r.prompt, x=r.stepsize,
                      note=f"iterations={r.num_iterations}")
        rep.add("bag_mass", r.mass, **common)
        rep.add("bag_mass_unperturbed_model", r.mass_unpert, **common)
        rep.add("fraction_tokens_in_bag", r.in_bag, **common)
        rep.add("perplexity", r.perplexity, **common)
    rep.figure(_plot(table, bags), "tradeoff", main=True)

    # the finding, from the numbers
    lines, summary = [], []
    for bag in bags:
        part = table[table["bag"] == bag.name]
        prompts_here = part["prompt"].unique()
        base = part[part["run"] == "unsteered"]
        steered = part[part["run"] == "steered"].groupby(["stepsize", "num_iterations"])[["mass", "perplexity"]].mean()
        best = steered["mass"].idxmax()
        b_mass, b_ppl = float(base["mass"].mean()), float(base["perplexity"].mean())
        s_mass, s_ppl = float(steered.loc[best, "mass"]), float(steered.loc[best, "perplexity"])
        summary.append({"bag": bag.name, "words": len(bag), "multi-token words": len(bag.multi_token_words),
                        "prompts": len(prompts_here), "unsteered mass": _sci(b_mass), "best steered mass": _sci(s_mass),
                        "at α, iterations": f"{best[0]:g}, {best[1]}", "mass ratio": f"{s_mass / b_mass:.3g}",
                        "unsteered perplexity": f"{b_ppl:.4g}", "steered perplexity": f"{s_ppl:.4g}"})
        lines.append(f"{bag.name}: mass {_sci(b_mass)} unsteered → {_sci(s_mass)} steered (α = {best[0]:g}, "
                     f"{best[1]} iteration(s); ×{s_mass / b_mass:.3g}), perplexity {b_ppl:.4g} → {s_ppl:.4g}")
    masses = {row["bag"]: float(row["unsteered mass"]) for row in summary}
    ko = [b.name for b in bags if _korean(b)]
    en = [b.name for b in bags if not _korean(b)]
    finding = f"Subject: {what}. " + "; ".join(lines) + "."
    if ko and en:
        finding += (f" The Korean bag's unsteered mass ({_sci(masses[ko[0]])}) is {masses[en[0]] / masses[ko[0]]:.2g} "
                    f"times smaller than the English bag's ({_sci(masses[en[0]])}): each Korean word is several byte "
                    f"tokens under this tokenizer, so its whole-word probability is a product of small pieces.")
    if untrained:
        ppl = table["perplexity"]
        finding += (" These are the untrained twin's numbers: its weights are random, so they show how PPLM's "
                    "gradient steps move the next-token distribution toward a bag and what that costs the unsteered "
                    "model's likelihood (the mechanics), and say nothing about language, topics or fluency: every "
                    f"perplexity here is {ppl.min():.0f} to {ppl.max():.0f}, over a vocabulary of {len(subject.tokenizer)} "
                    "tokens.")
    control = ("The unsteered continuation of the same prompt and seed (step size 0, computed in every run and "
               "checked identical) is the baseline drawn beside every steered setting; `bag_mass_unperturbed_model` "
               "in results.csv is the unsteered model's mass along the steered text (what the context alone gives).")
    if any(s["prompts"] == 1 for s in summary) and len(prompts) > 1:
        control += (" Bags of multi-token words ran on the first prompt, the fewest iterations and the two largest "
                    "step sizes only (--multi-token-grid reduced), to fit the CPU budget.")
    rep.write(finding=finding, control=control, published=PUBLISHED, summary=pd.DataFrame(summary))
    if not args.quiet:
        print(finding)
        print(f"wrote {args.out}/results.md, results.csv, tradeoff.png, tradeoff.csv")


if __name__ == "__main__":
    run_main(main)
