"""Build the kinship battery: text stimuli for concepts of people, kin, animals, colours and places.

Forms per concept (Quiroga-style invariance, in text):

* ``text-name``       a sentence naming the concept ("I called my mother yesterday.")
* ``text-definition`` a sentence describing it without naming it ("the woman who gave birth to me")
* ``text-foreign``    the name in another language inside a sentence ("Ma mère ...")

Every stimulus carries a cloze sentence and target for the masked / next-token /
seq2seq readouts.  Templates alternate between the screening and testing splits.
Run ``python probes/kinship/make_battery.py`` to regenerate ``stimuli.csv`` and ``battery.json``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# concept: (category, names, definitions, foreign words)
CONCEPTS = {
    "grandmother": ("kinship", ["grandmother", "grandma"], ["the mother of my father", "the mother of my mother"], ["abuela", "grand-mère", "Großmutter"]),
    "grandfather": ("kinship", ["grandfather", "grandpa"], ["the father of my mother", "the father of my father"], ["abuelo", "grand-père", "Großvater"]),
    "mother": ("kinship", ["mother", "mom"], ["the woman who gave birth to me", "the woman who raised me as her child"], ["madre", "mère", "Mutter"]),
    "father": ("kinship", ["father", "dad"], ["the man whose child I am", "the man who raised me as his child"], ["padre", "père", "Vater"]),
    "sister": ("kinship", ["sister"], ["the girl who has the same parents as me", "the daughter of my parents other than me"], ["hermana", "sœur", "Schwester"]),
    "brother": ("kinship", ["brother"], ["the boy who has the same parents as me", "the son of my parents other than me"], ["hermano", "frère", "Bruder"]),
    "daughter": ("kinship", ["daughter"], ["the girl I raised as my own child", "my female child"], ["hija", "fille", "Tochter"]),
    "son": ("kinship", ["son"], ["the boy I raised as my own child", "my male child"], ["hijo", "fils", "Sohn"]),
    "aunt": ("kinship", ["aunt"], ["the sister of my mother", "the sister of my father"], ["tía", "tante", "Tante"]),
    "uncle": ("kinship", ["uncle"], ["the brother of my father", "the brother of my mother"], ["tío", "oncle", "Onkel"]),
    "halle berry": ("person", ["Halle Berry"], ["the actress who played Catwoman in 2004", "the first Black woman to win the Oscar for best actress"], ["la actriz Halle Berry", "l'actrice Halle Berry", "die Schauspielerin Halle Berry"]),
    "einstein": ("person", ["Einstein", "Albert Einstein"], ["the physicist who discovered relativity", "the scientist famous for E equals m c squared"], ["el físico Einstein", "le physicien Einstein", "der Physiker Einstein"]),
    "shakespeare": ("person", ["Shakespeare", "William Shakespeare"], ["the playwright who wrote Hamlet", "the poet who wrote Romeo and Juliet"], ["el dramaturgo Shakespeare", "le dramaturge Shakespeare", "der Dichter Shakespeare"]),
    "dog": ("animal", ["dog"], ["the animal that barks and wags its tail", "the pet that fetches sticks and guards the house"], ["perro", "chien", "Hund"]),
    "cat": ("animal", ["cat"], ["the pet that purrs and chases mice", "the small animal that meows"], ["gato", "chat", "Katze"]),
    "horse": ("animal", ["horse"], ["the animal people ride and that gallops", "the animal that pulls a carriage and neighs"], ["caballo", "cheval", "Pferd"]),
    "bird": ("animal", ["bird"], ["the animal with feathers that sings and flies", "the creature that builds a nest and lays eggs"], ["pájaro", "oiseau", "Vogel"]),
    "fish": ("animal", ["fish"], ["the animal that swims with fins and gills", "the creature that lives in the water and has scales"], ["pez", "poisson", "Fisch"]),
    "red": ("colour", ["red"], ["the colour of blood and ripe tomatoes", "the colour of a stop sign"], ["rojo", "rouge", "rot"]),
    "blue": ("colour", ["blue"], ["the colour of the clear sky", "the colour of the deep ocean"], ["azul", "bleu", "blau"]),
    "green": ("colour", ["green"], ["the colour of fresh grass", "the colour of leaves in summer"], ["verde", "vert", "grün"]),
    "yellow": ("colour", ["yellow"], ["the colour of bananas and lemons", "the colour of the sun in a child's drawing"], ["amarillo", "jaune", "gelb"]),
    "paris": ("place", ["Paris"], ["the capital of France", "the city of the Eiffel Tower"], ["la ciudad de París", "la ville de Paris", "die Stadt Paris"]),
    "london": ("place", ["London"], ["the capital of England", "the city of Big Ben and the Thames"], ["la ciudad de Londres", "la ville de Londres", "die Stadt London"]),
    "tokyo": ("place", ["Tokyo"], ["the capital of Japan", "the largest city in Japan"], ["la ciudad de Tokio", "la ville de Tokyo", "die Stadt Tokio"]),
}

NAME_TEMPLATES = [
    ("I thought about {x} all day.", "screening"),
    ("Yesterday I saw a picture of {x}.", "testing"),
    ("Everyone was talking about {x}.", "screening"),
    ("This story is about {x}.", "testing"),
]
DEF_TEMPLATES = [
    ("I thought about {x} all day.", "screening"),
    ("This story is about {x}.", "testing"),
]
FOREIGN_TEMPLATES = [("{x}", "screening"), ("{x}.", "testing")]

# appended to the stimulus: the readout asks the subject to name what the stimulus was about
CLOZE = {
    "kinship": "In one word, this is about my {mask}.",
    "person": "In one word, this is about {mask}.",
    "animal": "In one word, this is about the {mask}.",
    "colour": "In one word, this is about the colour {mask}.",
    "place": "In one word, this is about {mask}.",
}

PROMPTS = {
    "kinship": "my {name}",
    "person": "{name}",
    "animal": "a {name}",
    "colour": "the colour {name}",
    "place": "the city of {name}",
}


def build() -> None:
    rows = []
    concepts = {}
    for concept, (category, names, definitions, foreign) in CONCEPTS.items():
        main = names[0]
        concepts[concept] = {"prompt": PROMPTS[category].format(name=main), "names": names, "category": category}
        target = main
        k = 0
        for name in names[:2]:
            for tmpl, split in NAME_TEMPLATES:
                det = "my " if category == "kinship" else ("a " if category == "animal" else "")
                text = tmpl.format(x=det + name if category != "colour" else f"the colour {name}")
                rows.append(dict(id=f"{concept.replace(' ', '_')}-name-{k}", concept=concept, modality="text",
                                 form="text-name", split=split, text=text, image="", cloze=f"{text} {CLOZE[category]}", target=target))
                k += 1
        for i, definition in enumerate(definitions):
            for tmpl, split in DEF_TEMPLATES:
                text = tmpl.format(x=definition)
                rows.append(dict(id=f"{concept.replace(' ', '_')}-def-{i}-{split[0]}", concept=concept, modality="text",
                                 form="text-definition", split=split, text=text, image="", cloze=f"{text} {CLOZE[category]}", target=target))
        for i, word in enumerate(foreign):
            tmpl, split = FOREIGN_TEMPLATES[i % 2]
            rows.append(dict(id=f"{concept.replace(' ', '_')}-foreign-{i}", concept=concept, modality="text",
                             form="text-foreign", split=split, text=tmpl.format(x=word), image="",
                             cloze=f"{tmpl.format(x=word)} {CLOZE[category]}", target=target))
    meta = {
        "name": "kinship",
        "description": "Text stimuli for kin, named people, animals, colours and places; forms: name, definition, foreign word.",
        "concepts": concepts,
        "licence": "CC0-1.0 (written for neuroprobe)",
    }
    (HERE / "battery.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(HERE / "stimuli.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"{len(rows)} stimuli, {len(concepts)} concepts")


if __name__ == "__main__":
    build()
