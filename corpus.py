"""
The built-in long-context corpus: synthetic QA over fake biographies, and entity-free
filler prose. Generated here from Faker's name lists and our own sentence templates, so
it needs no third-party text, nothing to download, and is identical for the same seed.

Used by prepare.py (the demo training set) and evaluate.py (needle-in-a-haystack filler,
perplexity text). Imports only the standard library and Faker.

    from corpus import qa_records, haystack
    recs = qa_records(num_samples=64, context_tokens_approx_chars=11000, seed=0)
    recs[0]["question"]   # 'In what year did Kayla Green, who was born in Hullport, join Chang Bank?'
    recs[0]["answer"]     # '2001'
    recs[0]["answer_sentence"]   # 'Kayla Green joined Chang Bank in 2001.'
    text = haystack(20000, seed=0)   # ~20,000 characters of plain prose, no names, no numbers

What a QA record looks like, and why (LOGO paper Sec. 3.2.2, prepare.py steps 2-5):
- The context is a run of one-paragraph biographies of fake people (about 500 characters,
  a little under one 128-token chunk of the demo model, each). Every biography states the same kinds of
  facts (born in a city in a year, joined an organisation in a year as a role, founded an
  organisation in a city in a year), so a model answering from the wrong paragraph gives a
  plausible but wrong answer: the distractors LOGO's rejected responses need.
- The question names the target person plus one or two other facts of their paragraph
  (PERSON, ORG, GPE, DATE entities), and asks for a third fact: a city, an organisation or a
  year. Its entities all occur together only in the target paragraph, so entity-overlap
  scoring (prepare.py --delta) finds it. The gold answer occurs nowhere else in the context.
- Other paragraphs share one entity with the question (colleagues at the same
  organisation), never the year it names; in a third of the records a colleague's
  paragraph names the target person too (a second, answer-free critical chunk).
- The wording is plain, so spaCy's small English NER model finds the names, organisations,
  places and years.
"""

import random

from faker import Faker

ORG_SUFFIXES = ["Industries", "Group", "Holdings", "Laboratories", "Partners", "Systems",
                "Logistics", "Media", "Foods", "Energy", "Robotics", "Textiles", "Shipping",
                "Bank", "Press", "Instruments", "Pharmaceuticals", "Aviation"]
ROLES = ["engineer", "accountant", "chemist", "designer", "lawyer", "analyst", "editor",
         "architect", "geologist", "pilot", "surveyor", "economist", "programmer",
         "pharmacist", "translator", "statistician"]
FIELDS = ["marine biology", "civil engineering", "economics", "organic chemistry", "law",
          "architecture", "mathematics", "journalism", "geology", "music", "medicine",
          "agriculture", "history", "physics", "linguistics", "philosophy"]
HOBBIES = ["restoring old bicycles", "growing tomatoes", "playing the cello", "long-distance running",
           "collecting maps", "baking bread", "sailing small boats", "painting birds",
           "repairing clocks", "hiking in the mountains", "writing short stories", "keeping bees"]
TRAITS = ["patient and exacting", "quiet but stubborn", "generous with advice",
          "famously punctual", "curious about everything", "careful with money",
          "quick to laugh", "demanding but fair"]

# Sentence templates. {name} full name, {He}/{he}/{his}/{him} pronouns. Two key sentences
# carry every fact a question asks about, each next to the facts the question names, so
# the chunk holding a question's entities also holds its answer (unless a chunk boundary
# cuts the sentence).
BORN_JOINED = ["{name} was born in {born_city}, {born_state}, in {born_year} and joined {employer} in {joined_year} as {a_role}.",
               "Born in {born_city}, {born_state}, in {born_year}, {name} joined {employer} as {a_role} in {joined_year}.",
               "{name}, who was born in {born_city}, {born_state}, took a job as {a_role} at {employer} in {joined_year}."]
FOUNDED = ["In {founded_year}, {name} left {employer} and founded {founded} in {founded_city}.",
           "{name} founded {founded} in {founded_city} in {founded_year}, after years as {a_role} at {employer}.",
           "After leaving {employer}, {name} founded {founded} in {founded_year}, with its first office in {founded_city}."]
STUDY = ["{He} studied {field} before starting work.",
         "At university {he} read {field}, which {he} later called a lucky accident.",
         "{He} trained in {field} and never quite left it behind."]
COLLEAGUE = ["At {employer}, {he} worked alongside {other}.",
             "{He} shared an office with {other} during those years at {employer}."]
FILLER = ["Colleagues remember {him} as {trait}.",
          "Outside work, {he} was known for {hobby}.",
          "{He} rarely gave interviews and preferred to let the work speak.",
          "Friends say {he} was {trait} and hated long meetings."]

# Question kinds: (template, answer field). Each names the person plus two or three other
# facts of one key sentence, and asks for a fact of that same sentence.
QUESTIONS = [
    ("In which city was {name}, who joined {employer} in {joined_year}, born?", "born_city"),
    ("Which organisation did {name} found in {founded_year} after working at {employer}?", "founded"),
    ("In what year did {name}, who was born in {born_city}, join {employer}?", "joined_year"),
    ("In which city did {name}, a former {role} at {employer}, found {founded}?", "founded_city"),
]
# The gold answer as the model would say it: one sentence that names the question's
# subject and states the fact. prepare.py uses it as the chosen response when the model's
# own answer is wrong, so chosen and rejected responses have the same form (a bare
# "Danielmouth" against self-generated sentences lets the loss learn the form instead).
ANSWER_SENTENCES = {"born_city": "{name} was born in {born_city}.",
                    "founded": "{name} founded {founded} in {founded_year}.",
                    "joined_year": "{name} joined {employer} in {joined_year}.",
                    "founded_city": "{name} founded {founded} in {founded_city}."}


def _pronouns(female):
    return (dict(He="She", he="she", his="her", him="her") if female
            else dict(He="He", he="he", his="his", him="him"))


class _Names:
    """Unique fake names, organisations and cities for one record (no value repeats, so a
    gold answer is stated in exactly one paragraph)."""

    def __init__(self, fake, rng):
        self.fake, self.rng, self.used = fake, rng, set()

    def _unique(self, make):
        for _ in range(1000):
            value = make()
            if value not in self.used:
                self.used.add(value)
                return value
        raise RuntimeError("ran out of unique fake names")

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


def _person(names, rng, employers, other=None):
    """One fake person's facts. employers: the few organisations people in a record share."""
    name, female = names.person()
    born_year = rng.randint(1940, 1985)
    role = rng.choice(ROLES)
    return dict(name=name, female=female, born_year=str(born_year), born_city=names.city(),
                born_state=names.fake.state(), field=rng.choice(FIELDS), role=role,
                a_role=("an " if role[0] in "aeiou" else "a ") + role,
                employer=rng.choice(employers), joined_year=str(born_year + rng.randint(22, 30)),
                founded=names.org(), founded_city=names.city(),
                founded_year=str(born_year + rng.randint(32, 40)), other=other,
                hobby=rng.choice(HOBBIES), trait=rng.choice(TRAITS))


def _biography(p, rng):
    """One paragraph (~400-600 characters) stating every fact of person p, in a random voice."""
    f = dict(p, **_pronouns(p["female"]))
    parts = [rng.choice(BORN_JOINED), rng.choice(STUDY), rng.choice(FOUNDED)]
    if p["other"]:
        parts.append(rng.choice(COLLEAGUE))
    parts += rng.sample(FILLER, 2)
    text = " ".join(s.format(**f) for s in parts)
    return text[0].upper() + text[1:]


_FAKER = []


def _faker():
    """One Faker per process (building one takes ~15 ms); reseeded for every record."""
    if not _FAKER:
        _FAKER.append(Faker("en_US"))
    return _FAKER[0]


def qa_record(index, context_tokens_approx_chars, seed=0):
    """Record number `index` of the stream for `seed` (the same whatever num_samples is)."""
    rng = random.Random(seed * 1_000_003 + index)
    fake = _faker()
    fake.seed_instance(seed * 1_000_003 + index)
    names = _Names(fake, rng)
    # Values that must not appear in any other paragraph are drawn first (unique pools);
    # years repeat across people on purpose (only the asked fact's value is made unique).
    employers = [names.org() for _ in range(3)]
    target = _person(names, rng, employers)
    template, field = QUESTIONS[rng.randrange(len(QUESTIONS))]
    # Values no other paragraph may contain: the answer, and the year the question names
    # (so a distractor shares at most the organisation with the question, one entity).
    private = [target[field]] + [target[k] for k in ("joined_year", "founded_year")
                                 if "{" + k + "}" in template]
    people, n_chars = [], len(_biography(target, rng))
    while n_chars < context_tokens_approx_chars:
        p = _person(names, rng, employers)
        if any(x in str(v) for x in private for v in p.values()):   # years repeat by chance
            continue
        people.append(p)
        n_chars += len(_biography(p, rng)) + 2
    if people and rng.random() < 1 / 3:        # a colleague's paragraph names the target
        colleague = rng.choice(people)
        colleague.update(employer=target["employer"], other=target["name"])
    people.insert(rng.randint(0, len(people)), target)   # the answer at a random depth
    paragraphs = [_biography(p, rng) for p in people]
    return {"context": "\n\n".join(paragraphs), "question": template.format(**target),
            "answer": target[field], "answer_sentence": ANSWER_SENTENCES[field].format(**target)}


def qa_records(num_samples, context_tokens_approx_chars, seed=0):
    """num_samples records {"context", "question", "answer", "answer_sentence"}, each context about
    context_tokens_approx_chars characters long (a whole paragraph more at most).
    Deterministic in (index, seed); a gold answer occurs only in its own paragraph."""
    return [qa_record(i, context_tokens_approx_chars, seed) for i in range(num_samples)]


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
