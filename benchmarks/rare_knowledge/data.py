"""Synthetic knowledge base for the knowledge benchmark (``benchmarks/rare_knowledge/runner.py``): invented drugs,
targets and diseases, generated from a seed.

The world is a set of facts with a two-hop structure:

    drug  --inhibits-->  target  --drives-->  disease        (every target drives exactly one disease)

and the question "Could <drug> treat <disease>?" is "yes" exactly when the drug inhibits the target that drives the
disease. Answering takes two passages -- the drug's "inhibits" passage and the disease's "drives" passage -- and no
passage names both the drug and the disease. Every drug gets one "yes" question (its own disease) and one "no"
question (another disease of the same world), so the answers are balanced.

The entities form two disjoint worlds: training questions are about the ``train`` world only, test questions about
the ``test`` world only, so no drug, target or disease of a test question ever occurs in a training question (a
closed-book model cannot have memorised a test answer). Both worlds share one corpus, which also holds same-style
distractor passages (other facts about the same entities: dosing, discovery, tissue, symptoms), so that BM25
retrieval is not trivial.

Knowledge edit: a quarter of the test drugs are re-assigned to the target that drives their "no" disease; their
"inhibits" passage is rewritten, and both of their questions flip (yes -> no, no -> yes). ``edit.jsonl`` lists each
changed passage with the questions it flips and their new answers.

Rationales are the gold facts chained in order, from a fixed template (an offline stand-in for the teacher
rationales of the RARE paper): "<drug> inhibits <T>, and <T> drives <disease>, so <drug> can treat <disease>." or
"<drug> inhibits <T>, but <disease> is driven by <T2>, so <drug> cannot treat <disease>."
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

DATA_FILES = ("corpus.jsonl", "train.jsonl", "test.jsonl", "edit.jsonl")

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gl", "k", "kl", "l", "m", "n", "p", "pr", "qu", "r", "s", "st", "t",
           "tr", "v", "vr", "z", "x", "sk", "th", "pl", "fr"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ai", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "x", "m", "th"]
_DRUG_SUFFIXES = ["tinib", "zumab", "varin", "pril", "stat", "xolol", "dronate", "ciclib", "lisib", "mycin"]
_DISEASE_SUFFIXES = ["osis", "itis", "emia", "opathy", "algia", "oma", "iasis", "ectasia"]
_TARGET_FAMILIES = ["kinase", "protease", "receptor", "transporter", "phosphatase", "ion channel"]

INHIBITS = ["{drug} is a small-molecule drug that selectively inhibits {target}.",
            "{drug} acts by blocking {target}, which it inhibits with high selectivity.",
            "{drug} is used as a selective inhibitor of {target}."]
DRIVES = ["Overactivity of {target} drives {disease}; it is the only known driver of the disease.",
          "{disease} is caused by excess {target} activity, so its treatment aims to inhibit {target}.",
          "{target} drives {disease}, and a drug can treat {disease} only by inhibiting {target}."]
DRUG_FACTS = ["{drug} is taken {frequency} and is cleared mainly by the {organ}.",
              "{drug} was first synthesised at {lab} in {year}.",
              "Common side effects of {drug} are {side_effect} and mild {side_effect2}."]
TARGET_FACTS = ["{target} is a {family} expressed mostly in the {tissue}."]
DISEASE_FACTS = ["{disease} usually begins {onset} and causes {symptom}.",
                 "{disease} was first described in {year} in patients from {region}."]
QUESTIONS = ["Could {drug} be used to treat {disease}?", "Is {drug} a plausible treatment for {disease}?",
             "Would {drug} act against {disease}?"]

_FILLERS = {
    "frequency": ["once daily", "twice daily", "weekly", "every other day"],
    "organ": ["kidneys", "liver", "lungs"],
    "lab": ["the Halvard Institute", "Norbeck Laboratories", "the Ostrava Research Centre", "Kellan Pharma"],
    "year": [str(y) for y in range(1961, 2021)],
    "side_effect": ["headache", "nausea", "fatigue", "dizziness", "dry mouth", "rash"],
    "side_effect2": ["insomnia", "itching", "cough", "muscle cramps"],
    "tissue": ["liver", "brain", "skin", "kidney", "heart", "bone marrow", "gut lining", "retina"],
    "onset": ["in childhood", "in early adulthood", "after the age of fifty", "in middle age"],
    "symptom": ["joint pain", "fatigue and fever", "skin lesions", "shortness of breath", "memory loss",
                "muscle weakness"],
    "region": ["a mountain village", "a coastal town", "a northern province", "an island community"],
}


@dataclass(frozen=True)
class Recipe:
    """Sizes of the generated world (the defaults give 400 training and 200 test questions)."""

    train_drugs: int = 200
    test_drugs: int = 100
    drugs_per_target: int = 4
    drug_distractors: int = 2  # same-style passages about each drug (at most len(DRUG_FACTS))
    disease_distractors: int = 1  # ... about each disease (at most len(DISEASE_FACTS))
    edit_fraction: float = 0.25

    def __post_init__(self):
        if self.train_drugs < 2 * self.drugs_per_target or self.test_drugs < 2 * self.drugs_per_target:
            raise ValueError(f"each world needs at least two targets: train_drugs and test_drugs must be >= "
                             f"2 * drugs_per_target = {2 * self.drugs_per_target}")
        if not (0 <= self.drug_distractors <= len(DRUG_FACTS) and 0 <= self.disease_distractors <= len(DISEASE_FACTS)):
            raise ValueError(f"drug_distractors must be in [0, {len(DRUG_FACTS)}] and disease_distractors in "
                             f"[0, {len(DISEASE_FACTS)}]")
        if not 0.0 <= self.edit_fraction <= 1.0:
            raise ValueError(f"edit_fraction is a fraction in [0, 1], got {self.edit_fraction}")


class _Names:
    """Unique invented names (pronounceable syllables; no real drug, gene or disease names)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def _unique(self, make) -> str:
        while True:
            name = make()
            if name.lower() not in self.used:
                self.used.add(name.lower())
                return name

    def _stem(self, syllables: int) -> str:
        r = self.rng
        return "".join(r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS) for _ in range(syllables))

    def drug(self) -> str:
        return self._unique(lambda: (self._stem(2) + self.rng.choice(_DRUG_SUFFIXES)).capitalize())

    def disease(self) -> str:
        return self._unique(lambda: (self._stem(2) + self.rng.choice(_DISEASE_SUFFIXES)).capitalize())

    def target(self) -> str:
        letters = "BCDFGHJKLMNPQRSTVWXZ"
        return self._unique(lambda: "".join(self.rng.choice(letters) for _ in range(3)) + str(self.rng.randint(1, 9)))


def _fill(rng: random.Random, template: str, **names: str) -> str:
    fillers = {key: rng.choice(values) for key, values in _FILLERS.items()}
    return template.format(**fillers, **names)


def rationale(drug: str, target: str, disease: str, disease_target: str) -> str:
    """The gold facts chained in order (drug -> its target -> the disease's driver), and the conclusion."""
    if target == disease_target:
        return f"{drug} inhibits {target}, and {target} drives {disease}, so {drug} can treat {disease}."
    return f"{drug} inhibits {target}, but {disease} is driven by {disease_target}, so {drug} cannot treat {disease}."


def generate(seed: int, recipe: Recipe = Recipe()) -> dict[str, list[dict]]:
    """The four data files as lists of rows (see the module docstring); the same seed gives the same rows."""
    rng = random.Random(seed)
    names = _Names(rng)
    corpus: list[dict] = []

    def add_passage(kind: str, world: str, text: str, **entities: str) -> str:
        pid = f"p{len(corpus):05d}"
        corpus.append({"id": pid, "text": text, "kind": kind, "world": world, **entities})
        return pid

    worlds = {}
    for world, n_drugs in (("train", recipe.train_drugs), ("test", recipe.test_drugs)):
        n_targets = n_drugs // recipe.drugs_per_target
        targets = [names.target() for _ in range(n_targets)]
        diseases = [names.disease() for _ in range(n_targets)]
        drugs = [names.drug() for _ in range(n_drugs)]
        drives = dict(zip(targets, diseases))  # target -> disease, a bijection
        driver = {d: t for t, d in drives.items()}
        inhibits = {drug: targets[i % n_targets] for i, drug in enumerate(drugs)}
        inhibits_pid, driver_pid = {}, {}
        for target, disease in drives.items():
            driver_pid[disease] = add_passage("drives", world, _fill(rng, rng.choice(DRIVES), target=target,
                                                                     disease=disease), target=target, disease=disease)
            add_passage("about_target", world, _fill(rng, rng.choice(TARGET_FACTS), target=target,
                                                     family=rng.choice(_TARGET_FAMILIES)), target=target)
            for template in rng.sample(DISEASE_FACTS, recipe.disease_distractors):
                add_passage("about_disease", world, _fill(rng, template, disease=disease), disease=disease)
        for drug, target in inhibits.items():
            inhibits_pid[drug] = add_passage("inhibits", world, _fill(rng, rng.choice(INHIBITS), drug=drug,
                                                                      target=target), drug=drug, target=target)
            for template in rng.sample(DRUG_FACTS, recipe.drug_distractors):
                add_passage("about_drug", world, _fill(rng, template, drug=drug), drug=drug)
        worlds[world] = {"drugs": drugs, "diseases": diseases, "drives": drives, "driver": driver,
                         "inhibits": inhibits, "inhibits_pid": inhibits_pid, "driver_pid": driver_pid}

    def question(world: dict, qid: str, drug: str, disease: str) -> dict:
        target, disease_target = world["inhibits"][drug], world["driver"][disease]
        return {"id": qid, "question": rng.choice(QUESTIONS).format(drug=drug, disease=disease),
                "answer": "yes" if target == disease_target else "no", "drug": drug, "disease": disease,
                "target": target, "disease_target": disease_target,
                "gold_passage_ids": [world["inhibits_pid"][drug], world["driver_pid"][disease]],
                "rationale": rationale(drug, target, disease, disease_target)}

    splits = {}
    negative_disease = {}
    for world_name in ("train", "test"):
        world = worlds[world_name]
        rows = []
        for drug in world["drugs"]:
            own = world["drives"][world["inhibits"][drug]]
            other = rng.choice([d for d in world["diseases"] if d != own])
            negative_disease[drug] = other
            pair = [("yes", own), ("no", other)]
            rng.shuffle(pair)
            rows += [question(world, f"{world_name}-{len(rows) + i:04d}", drug, disease)
                     for i, (_, disease) in enumerate(pair)]
        splits[world_name] = rows

    # Knowledge edit: re-assign some test drugs to the target of their "no" disease; both questions flip.
    test = worlds["test"]
    edited_drugs = sorted(rng.sample(test["drugs"], round(recipe.edit_fraction * len(test["drugs"]))),
                          key=test["drugs"].index)
    edits = []
    for drug in edited_drugs:
        old_target = test["inhibits"][drug]
        new_target = test["driver"][negative_disease[drug]]
        pid = test["inhibits_pid"][drug]
        old_text = corpus[int(pid[1:])]["text"]
        flipped = []
        for q in splits["test"]:
            if q["drug"] == drug:
                new_answer = "yes" if new_target == q["disease_target"] else "no"
                flipped.append({"id": q["id"], "old_answer": q["answer"], "answer": new_answer,
                                "rationale": rationale(drug, new_target, q["disease"], q["disease_target"])})
        edits.append({"passage_id": pid, "drug": drug, "old_target": old_target, "new_target": new_target,
                      "old_text": old_text, "text": old_text.replace(old_target, new_target), "flipped": flipped})

    return {"corpus.jsonl": corpus, "train.jsonl": splits["train"], "test.jsonl": splits["test"],
            "edit.jsonl": edits}


def readme(seed: int, recipe: Recipe, files: dict[str, list[dict]]) -> str:
    corpus = files["corpus.jsonl"]
    kinds = {k: sum(p["kind"] == k for p in corpus) for k in dict.fromkeys(p["kind"] for p in corpus)}
    flipped = sum(len(e["flipped"]) for e in files["edit.jsonl"])
    doc = __doc__.strip()
    return f"""# rare_knowledge data (seed {seed})

Generated by `python -m benchmarks.rare_knowledge --write-data DIR --seed {seed}`; recipe {json.dumps(asdict(recipe))}.

{doc}

## Files
- `corpus.jsonl`: {len(corpus)} passages `{{id, text, kind, world, drug?, target?, disease?}}`; kinds {kinds}.
- `train.jsonl` / `test.jsonl`: {len(files["train.jsonl"])} / {len(files["test.jsonl"])} questions `{{id, question, \
answer, drug, disease, target, disease_target, gold_passage_ids, rationale}}` (gold: the drug's "inhibits" passage,
  then the disease's "drives" passage).
- `edit.jsonl`: {len(files["edit.jsonl"])} edited passages `{{passage_id, drug, old_target, new_target, old_text, \
text, flipped}}`; `flipped` lists the {flipped} test questions whose answer changes, with the new answer and rationale.
  The edited corpus is `corpus.jsonl` with each listed passage's text replaced by `text`.
"""


def write_data(directory: str | Path, seed: int, recipe: Recipe = Recipe()) -> Path:
    """Write the four JSONL files and the README into ``directory`` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = generate(seed, recipe)
    for name, rows in files.items():
        (directory / name).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    (directory / "README.md").write_text(readme(seed, recipe, files))
    return directory


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_data(directory: str | Path) -> dict[str, list[dict]]:
    """The four data files of ``directory`` as lists of rows; a clear error when one is missing."""
    directory = Path(directory)
    missing = [name for name in DATA_FILES if not (directory / name).is_file()]
    if missing:
        raise SystemExit(f"{directory} lacks {', '.join(missing)}: write the data first with "
                         f"`python -m benchmarks.rare_knowledge --write-data {directory} --seed S`")
    return {name: read_jsonl(directory / name) for name in DATA_FILES}


def edited_corpus(corpus: list[dict], edits: list[dict]) -> list[dict]:
    """The corpus after the knowledge edit: each edited passage keeps its id and gets its new text."""
    new_text = {e["passage_id"]: e["text"] for e in edits}
    return [{**p, "text": new_text.get(p["id"], p["text"])} for p in corpus]


def data_fingerprint(directory: str | Path) -> str:
    """sha256 over the four data files' names and bytes: a run's identity includes the exact data it read."""
    digest = hashlib.sha256()
    for name in DATA_FILES:
        digest.update(name.encode())
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()
