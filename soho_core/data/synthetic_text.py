"""The words of the synthetic world: a fixed lexicon, captions, and the VQA, NLVR2 and
visual-entailment annotations, each a pure function of the visible objects and a
``random.Random`` (plus a :class:`Balancer` carrying answer counts across images).

    from soho_core.data.synthetic import sample_scene, captions_for, vqa_for
    scene = sample_scene(random.Random(0))
    captions_for(scene, random.Random(1), 5)

Every text is lowercase words from :func:`vocabulary`, with no punctuation. Objects are
anything with ``shape``, ``color``, ``size``, ``x`` and ``y`` (fractions of the image,
origin top left); the world, the balancing and the neutral class are described in
:mod:`soho_core.data.synthetic`.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from soho_core.data.synthetic import Scene

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
# Every colour and shape word starts with a consonant, so the article is always "a".
COLORS = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES = ("small", "large")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
MAX_COUNT = len(NUMBERS) - 1  # the most objects of one kind a text can mention
DIGITS = tuple(str(k) for k in range(MAX_COUNT + 1))  # VQA count answers, as in VQA v2
RELATIONS = ("to the left of", "to the right of", "above", "below")
OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below",
            "below": "above"}
# Centres closer than this along an axis (fraction of the width) are neither left nor right of
# each other: no text relies on a difference a viewer could not see.
RELATION_MARGIN = 0.05
REGION_MARGIN = 0.04  # objects this close to a third of the canvas get no region phrase
_REGIONS = {
    ("top", "left"): "in the top left", ("top", "center"): "at the top", ("top", "right"): "in the top right",
    ("middle", "left"): "on the left", ("middle", "center"): "in the center", ("middle", "right"): "on the right",
    ("bottom", "left"): "in the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "in the bottom right",
}
SIDES = ("left", "right")
ENTAILMENT, NEUTRAL, CONTRADICTION = "entailment", "neutral", "contradiction"
VE_LABELS = (ENTAILMENT, NEUTRAL, CONTRADICTION)

# Every sentence frame the generator uses; placeholders are whole words. vocabulary() reads them.
_FORMATS = (
    "there is {np}", "{np} {region}", "{np} {rel} {np}", "{number} objects including {np}",
    "{number} {color} objects", "{number} {plural}", "{np} and {np}",
    "what color is the {ref}", "what shape is the {ref} object", "what size is the {ref}",
    "how many {plural} are there", "how many {color} objects are there", "is there a {color} {shape}",
    "what shape is {rel} the {ref}", "is the {ref} {rel} the {ref}",
    "the {side} image has more {plural} than the {side} image", "both images contain a {color} object",
    "there is exactly one {shape} in total", "there are exactly {number} {plural} in total",
    "exactly one image contains a {shape}", "the {side} image contains a {color} {shape}",
    "there is a {color} {shape}", "there is no {color} {shape}", "there are at least two {plural}",
    "there is exactly one {shape}", "there are exactly {number} {plural}", "every {shape} is {color}",
)


def vocabulary() -> list[str]:
    """Every word any generated text or answer can contain, sorted; fixed, whatever the data."""
    words: set[str] = set()
    for fmt in _FORMATS:
        words.update(w for w in fmt.split() if not w.startswith("{"))
    groups = (SHAPES, PLURALS.values(), COLORS, SIZES, NUMBERS, DIGITS, RELATIONS, _REGIONS.values(),
              SIDES, ("yes", "no"), ("a",))
    for group in groups:
        for phrase in group:
            words.update(phrase.split())
    return sorted(words)


# ----------------------------------------------------------------------------- geometry


def holds(rel: str, a: Any, b: Any) -> bool:
    """``a rel b``, e.g. a is to the left of b, by more than RELATION_MARGIN (y grows downwards)."""
    dx, dy = b.x - a.x, b.y - a.y
    return {"to the left of": dx, "to the right of": -dx, "above": dy, "below": -dy}[rel] > RELATION_MARGIN


def unclear(rel: str, a: Any, b: Any) -> bool:
    """Neither ``a rel b`` nor its opposite can be read off the image."""
    d = a.x - b.x if rel in ("to the left of", "to the right of") else a.y - b.y
    return abs(d) <= RELATION_MARGIN


def region_of(o: Any) -> str | None:
    """The phrase for the ninth of the canvas holding o's centre; None near a border between ninths."""
    def third(v: float, names: tuple[str, str, str]) -> str | None:
        if min(abs(v - 1 / 3), abs(v - 2 / 3)) < REGION_MARGIN:
            return None
        return names[min(int(v * 3), 2)]

    col, row = third(o.x, ("left", "center", "right")), third(o.y, ("top", "middle", "bottom"))
    return _REGIONS[(row, col)] if col and row else None


def _refs(o: Any, objs: Sequence[Any], *forms: tuple[str, ...]) -> list[str]:
    """Definite descriptions (attribute words in size-colour-shape order) that pick out only o."""
    out = []
    for form in forms:
        if sum(all(getattr(p, a) == getattr(o, a) for a in form) for p in objs) == 1:
            out.append(" ".join(getattr(o, a) for a in form))
    return out


_ANY_REF = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


def _count(objs: Sequence[Any], **attrs: str) -> int:
    return sum(all(getattr(o, k) == v for k, v in attrs.items()) for o in objs)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else " ".join(items[:-1]) + " and " + items[-1]


def _with_number(n: int, shape: str, fmt_one: str, fmt_many: str) -> str:
    return fmt_one.format(shape=shape) if n == 1 else fmt_many.format(number=NUMBERS[n], plural=PLURALS[shape])


# ----------------------------------------------------------------------------- balancing


class Balancer:
    """Running counts of the answers (labels) given so far, one counter per task template.

    Giving the least-used answer that a scene allows keeps each template's answers near
    uniform over a dataset, so a question's wording alone predicts little about its answer.
    """

    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def choose(self, key: str, options: dict[Any, list[str]], rng: random.Random,
               labels: Sequence[Any] | None = None) -> Any:
        """The least-used answer among ``labels`` (strict: None unless the scene allows it),
        or among the answers ``options`` allows; ties broken by ``rng``; counted when chosen."""
        pool = list(labels) if labels is not None else [a for a, texts in options.items() if texts]
        if not pool:
            return None
        counts = self.counts[key]
        least = min(counts[a] for a in pool)
        answer = rng.choice([a for a in pool if counts[a] == least])
        if not options.get(answer):
            return None
        counts[answer] += 1
        return answer


Options = dict[Any, list[str]]  # answer or label -> the texts that have it


def _pick(task: str, order: list[tuple[str, Options]], labels: Sequence[Any] | None, rng: random.Random,
          balancer: Balancer, seen: set[str]) -> tuple[str, Any, str] | None:
    """(template, label, text) from the first template in ``order`` that can have the label
    its balance asks for; failing that (or without ``labels``), the first with any label."""
    fresh = [(name, {lab: [t for t in texts if t not in seen] for lab, texts in opts.items()})
             for name, opts in order]
    for strict in ((True, False) if labels else (False,)):
        for name, opts in fresh:
            label = balancer.choose(f"{task}/{name}", opts, rng, labels if strict else None)
            if label is not None:
                text = rng.choice(opts[label])
                seen.add(text)
                return name, label, text
    return None


# ----------------------------------------------------------------------------- captions


def _np(o: Any, rng: random.Random, p_size: float = 0.5, p_color: float = 1.0) -> str:
    words = ["a"] + [o.size] * (rng.random() < p_size) + [o.color] * (rng.random() < p_color) + [o.shape]
    return " ".join(words)


def _cap_list(objs, rng):
    return _join([_np(o, rng) for o in sorted(objs, key=lambda o: (o.x, o.y))])


def _cap_single(objs, rng):
    phrase = _np(rng.choice(objs), rng, p_color=0.8)
    return phrase if rng.random() < 0.5 else f"there is {phrase}"


def _cap_region(objs, rng):
    placed = [o for o in objs if region_of(o)]
    o = rng.choice(placed) if placed else None
    return f"{_np(o, rng, p_color=0.8)} {region_of(o)}" if o else None


def _cap_relation(objs, rng):
    pairs = []
    for a in objs:
        for b in objs:
            for rel in RELATIONS:
                along_x = rel in ("to the left of", "to the right of")
                dominant = abs(a.x - b.x) > abs(a.y - b.y) if along_x else abs(a.y - b.y) > abs(a.x - b.x)
                if a is not b and dominant and holds(rel, a, b):
                    pairs.append((a, rel, b))
    if not pairs:
        return None
    a, rel, b = rng.choice(pairs)
    return f"{_np(a, rng, p_size=0.3)} {rel} {_np(b, rng, p_size=0.3)}"


def _cap_groups(objs, rng, attr):
    groups = Counter(getattr(o, attr) for o in objs)
    if max(groups.values()) < 2:
        return None
    parts = []
    for value, n in groups.items():
        if n == 1:
            parts.append(_np(next(o for o in objs if getattr(o, attr) == value), rng, p_size=0.0))
        elif attr == "shape":
            parts.append(f"{NUMBERS[n]} {PLURALS[value]}")
        else:
            parts.append(f"{NUMBERS[n]} {value} objects")
    rng.shuffle(parts)
    return _join(parts)


def _cap_total(objs, rng):
    return f"{NUMBERS[len(objs)]} objects including {_np(rng.choice(objs), rng)}" if len(objs) > 1 else None


_CAPTIONS: tuple[tuple[str, Callable], ...] = (
    ("single", _cap_single), ("region", _cap_region), ("relation", _cap_relation),
    ("shapes", lambda objs, rng: _cap_groups(objs, rng, "shape")),
    ("colors", lambda objs, rng: _cap_groups(objs, rng, "color")), ("total", _cap_total),
)


def captions_for(scene: Scene, rng: random.Random, n: int) -> list[str]:
    """n distinct captions where the scene allows (a one-object scene has few), in random order.
    One lists every object left to right; the others cycle through the remaining templates."""
    objs = scene.objects
    rest = list(_CAPTIONS)
    rng.shuffle(rest)
    order = [_cap_list] + [fn for _, fn in rest]
    out: list[str] = []
    for k in range(8 * n + len(order)):
        if len(out) == n:
            break
        text = order[k % len(order)](objs, rng)
        if text and text not in out:
            out.append(text)
    out += [out[i % len(out)] for i in range(n - len(out))]  # tiny scenes repeat rather than fall short
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------- VQA


def _vqa_options(objs: Sequence[Any]) -> list[tuple[str, str, Options]]:
    """(template, answer_type, {answer: questions}) for every VQA template, from the visible objects."""
    def table() -> Options:
        return defaultdict(list)

    color, shape, size, count, exists, what, yesno = (table() for _ in range(7))
    for i, o in enumerate(objs):
        for ref in _refs(o, objs, ("shape",), ("size", "shape")):
            color[o.color].append(f"what color is the {ref}")
        for ref in _refs(o, objs, ("color",), ("size", "color")):
            shape[o.shape].append(f"what shape is the {ref} object")
        for ref in _refs(o, objs, ("shape",), ("color", "shape")):
            size[o.size].append(f"what size is the {ref}")
        others = [p for j, p in enumerate(objs) if j != i]
        refs = _refs(o, objs, *_ANY_REF)
        for rel in RELATIONS:
            hits = [p for p in others if holds(rel, p, o)]
            if refs and len(hits) == 1 and not any(unclear(rel, p, o) for p in others):
                what[hits[0].shape] += [f"what shape is {rel} the {ref}" for ref in refs]
            for p in others:
                answer = "yes" if holds(rel, p, o) else "no" if holds(OPPOSITE[rel], p, o) else None
                if answer:
                    yesno[answer] += [f"is the {rp} {rel} the {ref}" for rp in _refs(p, objs, *_ANY_REF)
                                      for ref in refs]
    for s in SHAPES:
        count[str(_count(objs, shape=s))].append(f"how many {PLURALS[s]} are there")
    for c in COLORS:
        count[str(_count(objs, color=c))].append(f"how many {c} objects are there")
    colors, shapes = {o.color for o in objs}, {o.shape for o in objs}
    for c in COLORS:
        for s in SHAPES:
            if _count(objs, color=c, shape=s):
                exists["yes"].append(f"is there a {c} {s}")
            elif c in colors or s in shapes:  # a near miss: the model must bind colour to shape
                exists["no"].append(f"is there a {c} {s}")
    return [("color", "other", color), ("shape", "other", shape), ("size", "other", size),
            ("count", "number", count), ("exists", "yes/no", exists), ("relation", "other", what),
            ("relation_yesno", "yes/no", yesno)]


def _confusions(truth: str) -> list[str]:
    """Plausible wrong answers a careless annotator gives instead of ``truth``."""
    for group in (COLORS, SHAPES, SIZES, ("yes", "no")):
        if truth in group:
            return [a for a in group if a != truth]
    return [str(v) for v in (int(truth) - 1, int(truth) + 1) if 0 <= v <= MAX_COUNT]


def human_answers(truth: str, rng: random.Random) -> list[str]:
    """10 answers: ``truth`` at least 8 times, and 0-2 confusions so that soft scores matter."""
    k = rng.choices((0, 1, 2), weights=(4, 3, 3))[0]
    wrong = _confusions(truth)
    answers = [truth] * (10 - k) + [rng.choice(wrong) for _ in range(k)]
    rng.shuffle(answers)
    return answers


def vqa_for(scene: Scene, rng: random.Random, n: int, balancer: Balancer | None = None) -> list[dict[str, Any]]:
    """Up to n distinct questions ({"question", "answers", "answer_type", "template"}), one
    template each in a random order before any repeats; answers balanced per template."""
    balancer = balancer or Balancer()
    templates = _vqa_options(scene.objects)
    rng.shuffle(templates)
    types = {name: kind for name, kind, _ in templates}
    seen: set[str] = set()
    out = []
    for k in range(n):
        order = [(name, opts) for name, _, opts in templates[k % len(templates):] + templates[:k % len(templates)]]
        got = _pick("vqa", order, None, rng, balancer, seen)
        if got is None:
            break
        name, answer, question = got
        out.append({"question": question, "answers": human_answers(answer, rng),
                    "answer_type": types[name], "template": name})
    return out


# ----------------------------------------------------------------------------- NLVR2


def _nlvr2_options(left: Sequence[Any], right: Sequence[Any]) -> list[tuple[str, Options]]:
    both = list(left) + list(right)
    shapes = [s for s in SHAPES if _count(both, shape=s)]
    colors = [c for c in COLORS if _count(both, color=c)]
    more, contain, total, one, side = ({True: [], False: []} for _ in range(5))
    for name, objs, other_name, other in (("left", left, "right", right), ("right", right, "left", left)):
        for s in shapes:
            more[_count(objs, shape=s) > _count(other, shape=s)].append(
                f"the {name} image has more {PLURALS[s]} than the {other_name} image")
        for c in COLORS:
            for s in SHAPES:
                here = _count(objs, color=c, shape=s) > 0
                if here or c in colors and s in shapes:
                    side[here].append(f"the {name} image contains a {c} {s}")
    for c in colors:
        contain[bool(_count(left, color=c) and _count(right, color=c))].append(f"both images contain a {c} object")
    # False totals reuse the numbers that are true of another shape, so the number says nothing.
    totals = {s: _count(both, shape=s) for s in SHAPES}
    for m in sorted({t for t in totals.values() if 1 <= t <= MAX_COUNT}):
        for s in SHAPES:
            total[totals[s] == m].append(_with_number(m, s, "there is exactly one {shape} in total",
                                                      "there are exactly {number} {plural} in total"))
    for s in shapes:
        one[(_count(left, shape=s) > 0) != (_count(right, shape=s) > 0)].append(f"exactly one image contains a {s}")
    return [("more", more), ("both", contain), ("total", total), ("one_image", one), ("side", side)]


def nlvr2_for(left: Scene, right: Scene, rng: random.Random, n: int,
              balancer: Balancer | None = None) -> list[dict[str, Any]]:
    """Up to n distinct statements ({"statement", "label": bool, "template"}) about an image pair."""
    balancer = balancer or Balancer()
    templates = _nlvr2_options(left.objects, right.objects)
    seen: set[str] = set()
    out = []
    for _ in range(n):
        rng.shuffle(templates)
        got = _pick("nlvr2", templates, (True, False), rng, balancer, seen)
        if got is None:
            break
        out.append({"statement": got[2], "label": got[1], "template": got[0]})
    return out


# ----------------------------------------------------------------------------- visual entailment


def _ve_options(objs: Sequence[Any], covered: bool) -> list[tuple[str, Options]]:
    """Hypotheses by template and label. ``covered``: the scene has a card that may hide any
    objects, so a claim that hidden objects could make true or false is neutral."""
    def judge(now_true: bool, hidden_can_flip: bool) -> str:
        if covered and hidden_can_flip:
            return NEUTRAL
        return ENTAILMENT if now_true else CONTRADICTION

    exists, none, at_least, exactly, every = ({lab: [] for lab in VE_LABELS} for _ in range(5))
    for c in COLORS:
        for s in SHAPES:
            seen = _count(objs, color=c, shape=s) > 0
            # A hidden object can only add: "there is" can become true, "there is no" false.
            exists[judge(seen, not seen)].append(f"there is a {c} {s}")
            none[judge(not seen, not seen)].append(f"there is no {c} {s}")
    for s in SHAPES:
        k = _count(objs, shape=s)
        at_least[judge(k >= 2, k < 2)].append(f"there are at least two {PLURALS[s]}")
        for m in (1, 2):
            exactly[judge(k == m, k <= m)].append(
                _with_number(m, s, "there is exactly one {shape}", "there are exactly {number} {plural}"))
        if k:  # "every cross is red" about no visible cross would be vacuous; never asked
            for c in COLORS:
                all_c = _count(objs, shape=s, color=c) == k
                every[judge(all_c, all_c)].append(f"every {s} is {c}")
    return [("exists", exists), ("none", none), ("at_least", at_least), ("exactly", exactly), ("every", every)]


def ve_for(scene: Scene, rng: random.Random, n: int, balancer: Balancer | None = None) -> list[dict[str, Any]]:
    """Up to n distinct hypotheses ({"hypothesis", "label", "template"}) with the image as premise;
    labels balanced per template, so wording alone says little (see the synthetic module)."""
    balancer = balancer or Balancer()
    templates = _ve_options(scene.objects, scene.card is not None)
    seen: set[str] = set()
    out = []
    for _ in range(n):
        rng.shuffle(templates)
        got = _pick("ve", templates, VE_LABELS, rng, balancer, seen)
        if got is None:
            break
        out.append({"hypothesis": got[2], "label": got[1], "template": got[0]})
    return out
