"""A generated knowledge base of fictional entities, and multi-hop questions over it.

Invariant: every question's answer is reached only by following its chain of documents, one
retrieval per hop: each document names the next entity of the chain (links run forward only,
so no document mentions an entity that links to it), and the last one holds the answer.

Names are drawn from seeded syllables (`_word`), so a model cannot know them from pretraining,
and every name word is unique in the base (a search for a name finds that entity only). Four
kinds of entity, linked forward (person -> company -> town -> region):
  person   born in a town, works for a company; birth year
  company  based in a town; founding year, employees
  town     lies in a region; population, founding year
  region   area in square kilometres
A question starts from a subject entity, follows `hops - 1` links and asks for a numeric
attribute of the entity it reaches ("What is the population of the town where Varn Ostel was
born?" needs Varn Ostel's document, then the town's), so answers are numbers that the
verifiers of `components.tasks.verifiers` check exactly. This is the multi-hop setting of
HotpotQA (Yang et al. 2018) on facts no model has seen.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field

from components.config import StrictConfig
from components.errors import ConfigError

KINDS = ("person", "company", "town", "region")  # the order their documents are listed in
SHARES = {"person": 0.5, "company": 0.2, "town": 0.2, "region": 0.1}  # of `entities`
LINKS = {"person": ("born_in", "works_for"), "company": ("based_in",), "town": ("in_region",), "region": ()}
TARGET = {"born_in": "town", "works_for": "company", "based_in": "town", "in_region": "region"}
ATTRIBUTES = {  # kind -> {attribute: (low, high)}
    "person": {"birth_year": (1700, 1999)},
    "company": {"founding_year": (1600, 1999), "employees": (10, 99_999)},
    "town": {"population": (1_000, 999_999), "founding_year": (900, 1899)},
    "region": {"area_km2": (500, 99_999)},
}
ATTRIBUTE_PHRASES = {"birth_year": "the birth year of {}", "founding_year": "the founding year of {}",
                     "employees": "the number of employees of {}", "population": "the population of {}",
                     "area_km2": "the area in square kilometres of {}"}
LINK_PHRASES = {"born_in": "the town where {} was born", "works_for": "the company that {} works for",
                "based_in": "the town where {} is based", "in_region": "the region that contains {}"}
MAX_HOPS = 4  # person -> company -> town -> region
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "r", "s", "t", "th",
           "v", "vr", "z", "y", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODAS = ["", "n", "r", "l", "s", "th", "m", "nd", "x", "v"]


class KnowledgeBaseConfig(StrictConfig):
    seed: int = Field(0, description="Draws every name, link and number.")
    entities: int = Field(400, ge=10, le=20_000, description="Documents in the base: half people, a fifth "
                                                             "companies, a fifth towns, a tenth regions.")


def _word(rng: random.Random, taken: set[str]) -> str:
    """A capitalised two-syllable invented word not in `taken` (which it joins)."""
    while True:
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(2)).capitalize()
        if word not in taken:
            taken.add(word)
            return word


def _entities(config: KnowledgeBaseConfig) -> list[dict[str, Any]]:
    """Every entity as {id, kind, name, links: {link: id}, attributes}, in `KINDS` order."""
    rng = random.Random(config.seed)
    taken: set[str] = set()
    counts = {kind: max(2, round(config.entities * share)) for kind, share in SHARES.items()}
    ids = {kind: [f"{kind}-{i:05d}" for i in range(counts[kind])] for kind in KINDS}
    entities = []
    for kind in KINDS:
        for entity_id in ids[kind]:
            words = 2 if kind == "person" else 1
            name = " ".join(_word(rng, taken) for _ in range(words))
            links = {link: rng.choice(ids[TARGET[link]]) for link in LINKS[kind]}
            attributes = {attribute: rng.randint(low, high) for attribute, (low, high) in ATTRIBUTES[kind].items()}
            entities.append({"id": entity_id, "kind": kind, "name": name, "links": links, "attributes": attributes})
    return entities


def _text(entity: dict[str, Any], names: dict[str, str]) -> str:
    """The document of one entity: its forward links and its attributes, nothing else."""
    name, links, values = entity["name"], {k: names[v] for k, v in entity["links"].items()}, entity["attributes"]
    return {
        "person": lambda: f"{name} is a person. {name} was born in {values['birth_year']} in the town of "
                          f"{links['born_in']}. {name} works for the company {links['works_for']}.",
        "company": lambda: f"{name} is a company based in the town of {links['based_in']}. It was founded in "
                           f"{values['founding_year']} and has {values['employees']} employees.",
        "town": lambda: f"{name} is a town in the region of {links['in_region']}. It was founded in "
                        f"{values['founding_year']} and has a population of {values['population']}.",
        "region": lambda: f"{name} is a region covering {values['area_km2']} square kilometres.",
    }[entity["kind"]]()


def generate_knowledge_base(config: KnowledgeBaseConfig) -> list[dict[str, Any]]:
    """The documents {id, title, text, kind, links, attributes} of the base; `id`, `title`
    and `text` are what a document store indexes, the rest is the ground truth questions use."""
    entities = _entities(config)
    names = {entity["id"]: entity["name"] for entity in entities}
    return [{"id": e["id"], "title": e["name"], "text": _text(e, names), "kind": e["kind"], "links": e["links"],
             "attributes": e["attributes"]} for e in entities]


def _chains(kind: str, links: int) -> list[tuple[str, ...]]:
    """Every sequence of `links` link names that starts from an entity of `kind`."""
    if links == 0:
        return [()]
    return [(link, *rest) for link in LINKS[kind] for rest in _chains(TARGET[link], links - 1)]


def lookup_question(kb: list[dict[str, Any]], seed: int, hops: int,
                    subject_ids: set[str] | None = None) -> dict[str, Any]:
    """A question that needs `hops` retrievals: {question, answer (a number, as text), chain
    (the document ids to retrieve, in order)}. The subject is drawn by `seed` from
    `subject_ids` (default: every document), among those with a chain of `hops` documents."""
    if not 1 <= hops <= MAX_HOPS:
        raise ConfigError(f"hops: {hops} is outside 1..{MAX_HOPS} (person -> company -> town -> region)")
    by_id = {doc["id"]: doc for doc in kb}
    subjects = [doc for doc in kb if (subject_ids is None or doc["id"] in subject_ids)
                and _chains(doc["kind"], hops - 1)]
    if not subjects:
        raise ConfigError(f"no subject with a chain of {hops} documents in a base of {len(kb)} documents")
    rng = random.Random(seed)
    subject = rng.choice(subjects)
    links = rng.choice(_chains(subject["kind"], hops - 1))
    chain, phrase = [subject["id"]], subject["title"]
    for link in links:
        chain.append(by_id[chain[-1]]["links"][link])
        phrase = LINK_PHRASES[link].format(phrase)
    last = by_id[chain[-1]]
    attribute = rng.choice(sorted(last["attributes"]))
    question = "What is " + ATTRIBUTE_PHRASES[attribute].format(phrase) + "?"
    return {"question": question, "answer": str(last["attributes"][attribute]), "chain": chain}
