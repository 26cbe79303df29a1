"""The README, the organism's card and the organism's own output say the same thing about multimodal cells.

A multimodal concept cell is one unit that fires for a digit's images *and* its names.
In the organism only the shared embedding (``joint.embed``) sees both modalities; the
card records what the criterion finds there, the README repeats it, and the recording
test below measures it again from the committed weights.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CARD = ROOT / "neuroprobe" / "subjects" / "organism" / "weights" / "card.json"


@pytest.fixture(scope="module")
def multimodal() -> dict:
    return json.loads(CARD.read_text(encoding="utf-8"))["phenomenon"]["multimodal"]


def _readme() -> str:
    return " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())


def test_readme_states_the_cards_multimodal_count(multimodal):
    readme = _readme()
    n = multimodal["cells"]
    assert f"{n} multimodal" in readme, "the README must state the organism's multimodal cell count from its card"
    if n == 0:
        # no sentence may say that multimodal concept cells emerge in the organism
        for sentence in re.split(r"(?<=[.;:])\s", readme):
            if re.search(r"multimodal (concept )?cells", sentence, re.I) and re.search(r"\bemerge", sentence, re.I):
                assert re.search(r"\b(no|0|none|not)\b", sentence, re.I), sentence
    joint = multimodal["joint.embed"]
    assert f"{joint['units']}-d" in readme or f"{joint['units']} units" in readme, "say where the modalities meet"


def test_organism_output_agrees_with_card(multimodal, tmp_path):
    """Record the committed organism at its two top tower sites and the joint embedding; count again."""
    import neuroprobe as npb

    subject = npb.load_subject("organism", device="cpu")
    battery = npb.load_battery("digits")
    sites = "image.fc,text.fc,joint.embed"
    rec = npb.record(subject, battery, tmp_path / "organism.h5", montage=sites, quiet=True)
    cells = npb.concept_cells(rec, quiet=True)
    assert int(cells["multimodal"].sum()) == multimodal["cells"]
    # the towers' cells each see one modality (text stimuli never reach image.fc, and the reverse)
    assert set(cells.loc[cells["is_cell"], "n_modalities"]) <= {1}
    joint = cells[cells["site"] == "joint.embed"]
    card = multimodal["joint.embed"]
    assert len(joint) == card["units"]
    assert (joint["n_modalities"] == 2).all()
    assert int(joint["is_candidate"].sum()) == card["candidates"]
    # every joint unit is tuned (AUC well above 0.5) yet far from the k = 5 SD effect a cell needs
    assert joint["z"].max() == pytest.approx(card["max_z"], rel=0.01)
    assert joint["auc"].mean() == pytest.approx(card["mean_auc"], rel=0.01)
