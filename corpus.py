"""
The built-in long-context corpus: synthetic QA over short fake biographies set in
entity-free filler prose, and that filler prose alone. Generated here from Faker's name
lists and our own sentence templates, so it needs no third-party text, nothing to
download, and is identical for the same seed.

Used by prepare.py (the demo training set; read_records: built-in or a JSONL file) and
evaluate.py (needle-in-a-haystack filler and needles, perplexity text). Imports only the
standard library and Faker (models, for an error message about a JSONL file).

    from corpus import qa_records, haystack
    recs = qa_records(num_samples=64, context_tokens_approx_chars=11000, seed=0)
    recs[0]["question"]   # 'In what year did Peter Richard, who was born in Williamshaven, join Tucker Foods?'
    recs[0]["answer"]     # '1996'
    recs[0]["answer_sentence"]   # 'Peter Richard joined Tucker Foods in 1996.'
    text = haystack(20000, seed=0)   # ~20,000 characters of plain prose, no names, no numbers

Why a record looks as it does (LOGO paper Sec. 3.2.2, prepare.py steps 2-5): see PEOPLE,
QUESTIONS and ANSWER_SENTENCES below; every person's biography states the same kinds of
facts, so an answer from the wrong paragraph is plausible but wrong: the distractors LOGO's
rejected responses need.
"""

import functools
import json
import random

from faker import Faker

ORG_SUFFIXES = ["Industries", "Group", "Holdings", "Laboratories", "Partners", "Systems",
                "Logistics", "Media", "Foods", "Energy", "Robotics", "Textiles", "Shipping",
                "Bank", "Press", "Instruments", "Pharmaceuticals", "Aviation"]
ROLES = ["engineer", "accountant", "chemist", "designer", "lawyer", "analyst", "editor",
         "architect", "geologist", "pilot", "surveyor", "economist", "programmer",
         "pharmacist", "translator", "statistician"]

# The calibrated task (results/README.md "Calibration"): PEOPLE short biographies,
# two sentences each, at random places in entity-free filler prose. With 4 people at ~1K
# tokens SmolLM2-135M-Instruct answers 30% from the full context and 90% from the answer's
# paragraph alone: it can read the fact, but the other people's cities, organisations and
# years pull its answer away in a long context (hallucinations). That gap is what LOGO
# should close. The first design (a context made only of long, alike biographies) left the
# base model at 0-5% whatever it read.
PEOPLE = 4
BIOGRAPHY = ["{name} was born in {born_city} in {born_year}.",
             "{He} joined {employer} in {joined_year} as {a_role}."]

# Question kinds: (template, answer field). Each names the person plus one or two other facts
# of their paragraph (PERSON, ORG, GPE entities, found together only there, so entity-overlap
# scoring finds it) and asks for a third.
QUESTIONS = [
    ("In which city was {name}, {a_role} at {employer}, born?", "born_city"),
    ("In what year did {name}, who was born in {born_city}, join {employer}?", "joined_year"),
    ("Which organisation did {name}, who was born in {born_city}, join?", "employer"),
]
# The gold answer as the model would say it: one sentence that names the question's
# subject and states the fact. prepare.py uses it as the chosen response when the model's
# own answer is wrong, so chosen and rejected responses have the same form (a bare
# "Danielmouth" against self-generated sentences lets the loss learn the form instead).
ANSWER_SENTENCES = {"born_city": "{name} was born in {born_city}.",
                    "joined_year": "{name} joined {employer} in {joined_year}.",
                    "employer": "{name} joined {employer}."}

class _Names:
    """Unique fake names, organisations and cities for one record (no value repeats, so a
    gold answer is stated in exactly one paragraph)."""

    def __init__(self, fake, rng):
        self.fake, self.rng, self.used = fake, rng, set()

    def _unique(self, make):
        value = next((v for v in (make() for _ in range(1000)) if v not in self.used), None)
        if value is None:
            raise RuntimeError("ran out of unique fake names")
        self.used.add(value)
        return value

    def person(self):
        female = self.rng.random() < 0.5
        first = self.fake.first_name_female if female else self.fake.first_name_male
        # Unique last names while they last (~1,000), so "Fisher" alone names one person.
        for _ in range(50):
            last = self.fake.last_name()
            if "last:" + last not in self.used:
                break
        self.used.add("last:" + last)
        return self._unique(lambda: f"{first()} {last}"), female

    def org(self):
        return self._unique(lambda: f"{self.fake.last_name()} {self.rng.choice(ORG_SUFFIXES)}")

    def city(self):
        return self._unique(self.fake.city)

def _person(names, rng):
    """One fake person's facts, each name, city and organisation unique in the record."""
    name, female = names.person()
    born_year = rng.randint(1940, 1985)
    role = rng.choice(ROLES)
    return dict(name=name, female=female, born_year=str(born_year), born_city=names.city(),
                role=role, a_role=("an " if role[0] in "aeiou" else "a ") + role,
                employer=names.org(), joined_year=str(born_year + rng.randint(22, 30)))

def _biography(p):
    f = dict(p, **(dict(He="She", he="she", his="her", him="her") if p["female"]
                   else dict(He="He", he="he", his="his", him="him")))
    return " ".join(s.format(**f) for s in BIOGRAPHY)

@functools.lru_cache(maxsize=None)
def _faker():
    """One Faker per process (building one takes ~15 ms); reseeded for every record."""
    return Faker("en_US")

def qa_record(index, context_tokens_approx_chars, seed=0):
    """Record number `index` of the stream for `seed` (the same whatever num_samples is)."""
    rng = random.Random(seed * 1_000_003 + index)
    fake = _faker()
    fake.seed_instance(seed * 1_000_003 + index)
    names = _Names(fake, rng)
    target = _person(names, rng)
    template, field = QUESTIONS[rng.randrange(len(QUESTIONS))]
    people = [target]
    while len(people) < PEOPLE:             # years repeat by chance: the answer's may not
        p = _person(names, rng)
        if target[field] not in (p["born_year"], p["joined_year"]):
            people.append(p)
    rng.shuffle(people)
    bios = [_biography(p) for p in people]
    filler_chars = max(context_tokens_approx_chars - sum(len(b) + 2 for b in bios), 0)
    paragraphs = haystack(filler_chars, seed=f"{seed}-{index}").split("\n\n") if filler_chars else []
    for b in bios:                           # each biography at a random paragraph boundary
        paragraphs.insert(rng.randint(0, len(paragraphs)), b)
    # distractors: the other people's values of the asked field, the wrong answers a model
    # copies from the wrong paragraph (evaluate.py's distractor-fact rate); never the answer.
    return {"context": "\n\n".join(paragraphs), "question": template.format(**target),
            "answer": target[field], "answer_sentence": ANSWER_SENTENCES[field].format(**target),
            "distractors": [p[field] for p in people if p is not target and p[field] != target[field]]}

def qa_records(num_samples, context_tokens_approx_chars, seed=0):
    """num_samples records {context, question, answer, answer_sentence, distractors}, contexts of
    about context_tokens_approx_chars characters; a gold answer only in its own paragraph."""
    return [qa_record(i, context_tokens_approx_chars, seed) for i in range(num_samples)]

# ----------------------------------------------------------------------------------------
# Where prepare.py's records come from: the built-in QA records above, or a JSONL file
# (--input) of {context, question[, answer, answer_sentence]} objects or LongBench's
# {context, input, answers}.

def read_records(path, num_samples, context_chars, seed=0, mine=lambda index: True):
    """Every record as (index, record or None, skip reason): the built-in ones (path None; contexts of
    about context_chars characters) or the file's lines. Only the records mine(index) accepts are made
    or parsed (a worker's; the others are None); a malformed one is an error (models.UserError)."""
    if path is None:             # record i is generated from (i, seed)
        return [(i, qa_record(i, context_chars, seed) if mine(i) else None, None) for i in range(num_samples)]
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise _error(f"cannot read the input: {e.strerror}", path, "check the --input path") from None
    numbered = [(n, raw) for n, raw in enumerate(lines, 1) if raw.strip()][:num_samples]  # blank: no record
    items = [(i,) + (parse_record(raw, f"{path}:{n}") if mine(i) else (None, None))
             for i, (n, raw) in enumerate(numbered)]
    if not items:
        raise _error("the input has no records", path, "give a JSONL file with one {context, question, answer} "
                     "object per line")
    return items

def parse_record(raw, where):
    """One JSONL line -> (record, None), or (None, reason) for a record that can make no sample (counted). A
    malformed line is an error: a file that is not the JSONL it should be is better fixed than half read."""
    bad = lambda what, todo: _error(what, where, todo)
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise bad(f"invalid UTF-8 at byte {e.start}", "re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise bad(f"malformed JSON: {e.msg} at column {e.colno}", "fix the line: one JSON object per line") from None
    if not isinstance(obj, dict):
        raise bad("the line is not a JSON object", "write one {...} object per line")
    fields = {"context": obj.get("context"), "question": obj.get("question", obj.get("input"))}
    for name, value in fields.items():                 # LongBench's question is its 'input'
        if not isinstance(value, str):
            alias = " (or LongBench's 'input')" if name == "question" else ""
            raise bad(f"record has no text field '{name}'{alias}", "every record needs 'context' and 'question' "
                      "strings")
    empty = [name for name, value in fields.items() if not value.strip()]
    if empty:                          # LongBench's gov_report, multi_news: 'input' is empty
        return None, f"empty_{empty[0]}"
    answer = obj.get("answer", obj.get("answers"))     # LongBench: 'answers', the first one is gold
    answer = (answer[0] if answer else None) if isinstance(answer, list) else answer
    answer = None if answer is None else str(answer) or None   # a bare number (a year) counts
    # answer_sentence counts only next to an answer: it stands in for a wrong chosen answer.
    sentence = obj.get("answer_sentence")
    sentence = sentence if isinstance(sentence, str) and answer and sentence.strip() else None
    return dict(fields, answer=answer, answer_sentence=sentence), None

def _error(what, where, todo):
    """models.UserError, printed by the scripts as one line; imported here only, as torch comes with models."""
    from models import UserError
    return UserError(f"{what} ({where}); {todo}")

# ----------------------------------------------------------------------------------------
# Filler prose: no names, no numbers, no facts a needle question could ask about
# (only seasons and times of day, which spaCy tags DATE/TIME).

_SUBJECTS = ["the old ferry", "a tired shepherd", "the morning market", "the river",
             "a small bakery", "the village school", "the north wind", "an empty orchard",
             "the lighthouse keeper", "a flock of geese", "the night train", "the baker's daughter",
             "the long valley", "a travelling tinker", "the harbour wall", "the stone bridge",
             "an old carpenter", "the evening tide", "a young teacher", "the quiet library"]
_VERBS = ["drifted past", "waited beside", "looked out over", "carried the smell of bread to",
          "slowly gave way to", "was remembered by", "leaned against", "went quiet near",
          "caught the first light above", "kept its distance from", "wandered along",
          "had long outlived", "settled into", "made little noise around"]
_OBJECTS = ["the fields", "the sleeping town", "a row of crooked houses", "the chapel roof",
            "the frozen pond", "the fishing boats", "the hills", "the crowded square",
            "a patch of wild thyme", "the cobbled lanes", "the old mill", "the garden gate",
            "the salt marsh", "the railway cutting", "the pine woods", "the washing lines"]
_TAILS = ["as the season turned", "long after the bells had stopped", "without anyone noticing",
          "in the grey hour before dawn", "while the kettle came to the boil",
          "as it had done for generations", "under a sky the colour of slate",
          "when the rain finally eased", "just as the lamps were lit", "through the whole of the winter"]
_ASIDES = ["Nobody could say exactly why.", "It was the kind of thing people stopped noticing.",
           "Some said it had always been that way.", "The children found it endlessly funny.",
           "By spring, the whole matter had been forgotten.", "It was neither good news nor bad."]

def _sentence(rng):
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.6:
        s += " " + rng.choice(_TAILS)
    if rng.random() < 0.3:
        s += f", and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    return s[0].upper() + s[1:] + "."

def haystack(num_chars, seed=0):
    """About num_chars characters (exactly, cut at a word boundary when possible) of plain
    filler prose in paragraphs: no names, places, organisations, years or numbers, so any
    fact a needle-in-a-haystack test inserts is the only one."""
    rng = random.Random(f"haystack-{seed}")
    paragraphs, n = [], 0
    while n < num_chars:
        sentences = [_sentence(rng) for _ in range(rng.randint(4, 8))]
        if rng.random() < 0.4:
            sentences.insert(rng.randint(1, len(sentences)), rng.choice(_ASIDES))
        paragraphs.append(" ".join(sentences))
        n += len(paragraphs[-1]) + 2
    text = "\n\n".join(paragraphs)[:num_chars]
    cut = text.rfind(" ")
    return text[:cut] if cut > num_chars * 0.9 else text

def filler_text(tok, num_tokens, text=None):
    """At least num_tokens tokens of tok: text repeated whole, or the filler prose (seed 0:
    the same for every model; 5 characters a token to start, doubled until enough)."""
    chars, out = num_tokens * 5, text if text is not None else haystack(num_tokens * 5, seed=0)
    while len(tok(out, add_special_tokens=False).input_ids) < num_tokens:
        chars *= 2
        out = out + "\n\n" + text if text is not None else haystack(chars, seed=0)
    return out

def insert_at_depth(context, needle, depth):
    """The needle after the last sentence end ('.' or newline) before the fraction depth in
    [0, 1] of the context, as the standard needle-in-a-haystack harness does."""
    if depth >= 1:
        return context.rstrip() + " " + needle
    at = int(len(context) * depth)
    cut = max(context.rfind(".", 0, at), context.rfind("\n", 0, at))
    return needle + " " + context if cut < 0 else context[:cut + 1] + " " + needle + context[cut + 1:]
