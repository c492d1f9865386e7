"""
Reading an answer out of a reply, and scoring it: what every measure of eval.py, GRPO's accuracy
reward and the difficulty filter agree on.

- the answer part: inside <answer>...</answer>, else after the last "Answer:", else after the last
  "the answer is", else the whole reply if it is a short direct answer (no ':', at most 12 words)
- multiple choice: one option letter, or the one option whose text the answer names
- numbers: the single number in the answer; counts (integer gold) exact, other numbers within 5%
- otherwise the one candidate answer it names (its type's training answers: with_candidates);
  naming none or several is unparseable, the same for every type
"""
import collections
import re


# a reply with no answer marker is read whole as a direct answer ("3", "Yes, a red one.") only if it is
# this short and holds no ':': a longer one, or a labelled step ("Row 1: nothing, a small red"), is a
# rationale that stopped before its answer, and its one number or colour is no answer
DIRECT_WORDS = 12


def extract_answer(text, marker="Answer:"):
    """The answer part of a reply: inside <answer>...</answer>, else after the last marker, else
    after the last "the answer is", else the whole reply if it reads as a direct answer (DIRECT_WORDS),
    else "" (no answer)."""
    if "<answer>" in text:
        text = text.split("<answer>")[-1].split("</answer>")[0]
    elif marker in text:
        text = text.split(marker)[-1]
    elif said := re.findall(r"answer is:?(.*)", text, flags=re.IGNORECASE | re.DOTALL):
        text = said[-1]
    elif ":" in text or len(text.split()) > DIRECT_WORDS:
        return ""
    return text.strip().strip(".").strip()


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


# "A" opening a sentence before a lower-case word: the article when the reply names an option by its
# text ("A green one."), the letter otherwise ("A is right", "A has the most circles", "A or B")
ARTICLE = re.compile(r"(?:^|(?<=[.!?]\s))A(?=\s+[a-z])")


def option_letter(pred, n_options, article=False):
    """The one option letter in pred ("(B)", "B.", "B) red", a bare "b"), else None. Within words,
    capitals only ("a" is an article); with article, ARTICLE's "A" is not a letter either."""
    bare = re.sub(r"[\W_]", "", pred)
    text = re.sub(r"[().:,]", " ", ARTICLE.sub(" ", pred) if article else pred)
    letters = {bare.upper()} if len(bare) == 1 else set(re.findall(r"\b([A-Z])\b", text))
    letters = {c for c in letters if 0 <= ord(c) - 65 < n_options}
    return letters.pop() if len(letters) == 1 else None


def names_said(pred, names):
    """The names that pred says as words, longest first, each occurrence counted once ("red" inside
    "dark red" is not "red"; "dark red and red" says both)."""
    text, said = pred.lower(), []
    for n in sorted({n for n in names if n}, key=len, reverse=True):
        pattern = rf"\b{re.escape(n)}\b"
        if re.search(pattern, text):
            said.append(n)
            text = re.sub(pattern, " ", text)
    return said


def named_once(pred, names):
    """The one name in names that pred says, else None: no name, or several."""
    said = names_said(pred, names)
    return said[0] if len(said) == 1 else None


def parse_answer(pred, gold, choices=None, candidates=None):
    """pred -> the form it is compared in, or None if no answer can be read. Multiple choice: one
    option letter, else the one option whose text it names. A number when the gold is one: the
    single number in pred. Otherwise, with candidate answers (the record's `candidates`, which
    evaluate() fills in: with_candidates): the one candidate pred names; without them, the
    lower-cased text. So "unparseable" means the same for every type: no candidate named, or more
    than one (for numbers: no number, or several). A known limit of naming: "yes, there are no
    squares" names both yes and no."""
    if choices:
        texts = [re.sub(r"^\(?[A-Z][).:]\s*", "", c).strip().lower() for c in choices]
        named = names_said(pred, texts)
        letter = option_letter(pred, len(choices), article=bool(named))
        return letter or (chr(65 + texts.index(named[0])) if len(named) == 1 else None)
    if NUMBER.fullmatch(str(gold).strip()):
        numbers = NUMBER.findall(pred.replace(",", ""))
        return float(numbers[0]) if len(numbers) == 1 else None
    if candidates:
        return named_once(pred, [str(c).strip().lower() for c in candidates])
    return pred.strip().lower() or None


def read_answer(rec, text):
    """The answer a reply gives to a record, parsed for comparison (None: it cannot be read)."""
    return parse_answer(extract_answer(text), rec["answer"], rec.get("choices"), rec.get("candidates"))


def matches(got, rec):
    """A parsed answer (read_answer) against the record's gold one: option letters; counting (integer
    gold) exact, 19 is not 20; other numbers within 5% (ChartQA's relaxed match); else exact text.
    An answer that cannot be read (None) is wrong."""
    gold, choices = str(rec["answer"]).strip(), rec.get("choices")
    if got is None:
        return False
    if isinstance(got, float):  # an integer gold ("20", not "20.0") is a count
        g = float(gold)
        return got == g if re.fullmatch(r"-?\d+", gold) else abs(got - g) <= 0.05 * abs(g)
    # a gold letter or option text
    return got == (parse_answer(gold, gold, choices) if choices else gold.lower())


def is_right(rec, text):
    """Whether a reply's answer is the record's gold one: every measure's, GRPO's and the filter's."""
    return matches(read_answer(rec, text), rec)


CLOSED_SET = 20  # a question type with more distinct training answers than this is open-ended


def candidate_sets(train_records):
    """Question type -> the distinct answers its training records give (case and spacing folded,
    sorted), for the types with at most CLOSED_SET of them: what an answer to a record of that type
    is read among. Records without a type, or of an open-ended type, get none."""
    by_type = collections.defaultdict(set)
    for r in train_records:
        if not r.get("choices") and r.get("type") is not None:
            by_type[r["type"]].add(str(r["answer"]).strip().lower())
    return {t: sorted(a) for t, a in by_type.items() if len(a) <= CLOSED_SET}


def with_candidates(records, train_records):
    """The records, each without choices or its own `candidates` given its type's candidate set and
    its own gold answer (so that a right answer unseen in training can still be read; which answer
    is gold is not told by a set that always holds it)."""
    sets = candidate_sets(train_records)
    own = lambda r: sorted(set(sets[r["type"]]) | {str(r["answer"]).strip().lower()})
    return [r if r.get("choices") or r.get("candidates") or r.get("type") not in sets
            else {**r, "candidates": own(r)}
            for r in records]
