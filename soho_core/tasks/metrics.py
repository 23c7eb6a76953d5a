"""Evaluation metrics for the downstream tasks, as pure functions (no model code).

* VQA v2: ``normalize_answer``, ``vqa_score`` (and per question ``vqa_scores``), ``vqa_soft_targets``,
  ``build_answer_vocab``.
* NLVR2 and SNLI-VE: ``accuracy``.
* Image-text retrieval (COCO / Flickr30K): ``retrieval_metrics``, and ``chance_recall`` (the same
  recalls for a ranking in random order).

Every score is a fraction in [0, 1], never a percentage.

Run the tests: ``python -m pytest -q tests/test_metrics.py``
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch

# --- VQA answer normalisation -----------------------------------------------------------------
# The behaviour (not the code) of the official VQA evaluation (GT-Vision-Lab/VQA, vqaEval.py).

# The only characters the official rule treats as punctuation. Periods have their own rule;
# apostrophes, colons and symbols such as # $ % & * ' : stay.
_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period not followed by a digit. The official pattern also meant "not preceded by a digit"
# but its look-behind is mistyped as a look-ahead, so only the next character counts: "2.5"
# and ".5" keep their period, "5." and "st." lose it.
_STRAY_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings that the official table restores. Only its lower-case, one-word
# entries: its capitalised keys ("Im", "Ive") can never match the lower-cased text, and it
# leaves out spellings that are also real words ("wed", "shed", "lets", "its", "id", "well").
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd",
    "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "oclock": "o'clock",
    "oughtnt": "oughtn't", "shant": "shan't", "shouldve": "should've", "shouldnt": "shouldn't",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all",
    "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}


def normalize_answer(s: str) -> str:
    """Normalise a VQA answer the way the official VQA v2 evaluation does.

    Steps, in order:
      1. newlines and tabs become spaces; leading/trailing whitespace is stripped; the text is
         lower-cased (the official script lower-cases later; no step below depends on case);
      2. punctuation, one character at a time over ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``,
         every decision read off the text as it was before this step: if the text contains a
         digit-comma-digit anywhere ("1,000"), or that character has a space right before or
         after it anywhere, every occurrence of it is deleted ("1,000" -> "1000",
         "yes, it is" -> "yes it is"); otherwise every occurrence becomes a space
         ("black-and-white" -> "black and white"). The rule is per character, not per
         occurrence: "ice-cream - yes" ends as "icecream yes";
      3. every period not followed by a digit is deleted ("2.5" stays, "u.s.a." -> "usa");
      4. the text is split on whitespace; each word "none"/"zero".."ten" becomes its digit
         ("none" -> "0"); the articles "a", "an", "the" are dropped; apostrophe-less
         contractions get their apostrophe back ("dont" -> "don't", "whats" -> "what's");
         the words are joined with single spaces.

    Not touched: apostrophes, colons, other symbols, numbers above ten, plurals.
    """
    text = s.replace("\n", " ").replace("\t", " ").strip().lower()
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for ch in _PUNCTUATION:
        if delete_all or f"{ch} " in text or f" {ch}" in text:
            out = out.replace(ch, "")
        else:
            out = out.replace(ch, " ")
    out = _STRAY_PERIOD.sub("", out)
    words = []
    for word in out.split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


# --- VQA scores, targets and vocabulary ---------------------------------------------------------


def vqa_score(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], official: bool = False
) -> float:
    """Mean VQA accuracy over questions, in [0, 1]: the mean of :func:`vqa_scores`."""
    scores = vqa_scores(predictions, answers, official)
    return sum(scores) / len(scores)


def vqa_scores(
    predictions: Sequence[str], answers: Sequence[Sequence[str]], official: bool = False
) -> list[float]:
    """VQA accuracy of each question, each in [0, 1] (per-type breakdowns average subsets).

    ``predictions[q]`` is the predicted answer to question q and ``answers[q]`` its human
    answers (10 in VQA v2); both sides go through ``normalize_answer``. With m = the number of
    human answers equal to the prediction:

    * ``official=False`` (default, our spec): accuracy = min(m / 3, 1).
    * ``official=True`` (the official evaluation): for each of the n annotators, count the
      matches among the other n - 1 answers; accuracy = mean over annotators of
      min(that count / 3, 1). An annotator who gave the predicted answer sees m - 1 matches,
      the others see m. For n = 10 this is 0, 0.3, 0.6, 0.9, 1 for m = 0, 1, 2, 3, >= 4,
      against 0, 1/3, 2/3, 1, 1 for the default.

    One more difference: the official script normalises only when the human answers disagree,
    and then only their punctuation; here both sides are always normalised in full, so a
    prediction "two" matches unanimous answers "2" (the official script scores it 0).
    """
    if len(predictions) != len(answers):
        raise ValueError(
            f"predictions has {len(predictions)} entries but answers has {len(answers)}"
        )
    if len(predictions) == 0:
        raise ValueError("vqa_score needs at least one question")
    out = []
    for q, (prediction, human) in enumerate(zip(predictions, answers)):
        if len(human) == 0:
            raise ValueError(f"answers[{q}] is empty: every question needs human answers")
        pred = normalize_answer(prediction)
        same = [normalize_answer(a) == pred for a in human]
        m = sum(same)
        if official:
            out.append(sum(min((m - hit) / 3.0, 1.0) for hit in same) / len(same))
        else:
            out.append(min(m / 3.0, 1.0))
    return out


def vqa_soft_targets(answers: Sequence[str], answer_to_index: dict[str, int]) -> dict[int, float]:
    """Soft training target of one question: {answer index: min(count / 3, 1)}, values in (0, 1].

    ``count`` is how many of the human ``answers`` normalise to that answer. The keys of
    ``answer_to_index`` must be normalised answers (as ``build_answer_vocab`` returns them);
    answers outside it are ignored, so the result may be empty. Used as the per-class target
    of the binary cross-entropy VQA head.
    """
    counts = Counter(normalize_answer(a) for a in answers)
    return {
        answer_to_index[answer]: min(count / 3.0, 1.0)
        for answer, count in counts.items()
        if answer in answer_to_index
    }


def build_answer_vocab(all_answer_lists: Iterable[Sequence[str]], size: int) -> list[str]:
    """The ``size`` most frequent normalised answers, most frequent first.

    Every human answer counts (a question whose 10 annotators all said "yes" adds 10 to
    "yes"). Equal counts are ordered alphabetically, so the list does not depend on the order
    of the data. Answers that normalise to the empty string ("a", "the") are not counted.
    Returns fewer than ``size`` answers when fewer distinct ones exist.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    counts: Counter[str] = Counter()
    for answers in all_answer_lists:
        counts.update(normalize_answer(a) for a in answers)
    counts.pop("", None)
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [answer for answer, _ in ranked[:size]]


# --- Classification (NLVR2, SNLI-VE) ------------------------------------------------------------


def accuracy(
    pred: torch.Tensor | np.ndarray | Sequence[int | bool],
    target: torch.Tensor | np.ndarray | Sequence[int | bool],
) -> float:
    """Fraction of positions where ``pred`` equals ``target``, in [0, 1].

    Both are class indices or booleans of the same shape (NLVR2: True/1 = the statement holds;
    SNLI-VE: 0/1/2 for the three labels); True equals 1 and False equals 0.
    """
    p = torch.as_tensor(pred)
    t = torch.as_tensor(target)
    if p.is_floating_point() or t.is_floating_point():
        raise TypeError("accuracy compares class indices or booleans, not floats (argmax first)")
    if p.shape != t.shape:
        raise ValueError(f"pred has shape {tuple(p.shape)} but target has shape {tuple(t.shape)}")
    if p.numel() == 0:
        raise ValueError("accuracy needs at least one example")
    return (p.long() == t.long()).double().mean().item()


# --- Image-text retrieval -----------------------------------------------------------------------

_RECALL_KS = (1, 5, 10)


def retrieval_metrics(
    scores: torch.Tensor | np.ndarray, text_to_image: torch.Tensor | np.ndarray
) -> dict[str, float]:
    """Recall@{1,5,10} in both directions and their mean, each a fraction in [0, 1].

    Args:
      scores: (num_images, num_texts) similarity, higher = better match.
      text_to_image: (num_texts,) integer index of each text's ground-truth image; an image
        may have several texts (5 captions in COCO and Flickr30K) and must have at least one.

    Returns a dict with
      ``txt_r1, txt_r5, txt_r10``: text retrieval (image -> text), the fraction of images for
        which at least one of their captions is in the top k texts;
      ``img_r1, img_r5, img_r10``: image retrieval (text -> image), the fraction of texts whose
        image is in the top k images;
      ``r_mean``: the mean of those six.

    Ties count against the model: the rank of a query's best ground-truth candidate is the
    number of WRONG candidates whose score is >= its score, and the query hits at k when that
    rank is < k. So a wrong candidate tied with the right one ranks above it, while ties among
    an image's own captions cost nothing. Memory is a few (num_images, num_texts) masks.
    """
    s = torch.as_tensor(scores)
    if not s.is_floating_point():
        s = s.double()  # the -inf fill below needs a float dtype
    owner = torch.as_tensor(text_to_image).long().to(s.device)
    if s.dim() != 2:
        raise ValueError(f"scores must be (num_images, num_texts), got shape {tuple(s.shape)}")
    num_images, num_texts = s.shape
    if owner.shape != (num_texts,):
        raise ValueError(f"text_to_image must have shape ({num_texts},), got {tuple(owner.shape)}")
    if num_texts == 0 or num_images == 0:
        raise ValueError("retrieval_metrics needs at least one image and one text")
    if owner.min() < 0 or owner.max() >= num_images:
        raise ValueError(f"text_to_image holds indices outside [0, {num_images})")
    # is_pair[i, t]: text t is a caption of image i.
    is_pair = owner.unsqueeze(0) == torch.arange(num_images, device=s.device).unsqueeze(1)
    captionless = (~is_pair.any(dim=1)).nonzero().flatten()
    if captionless.numel() > 0:
        raise ValueError(f"images {captionless[:10].tolist()} have no text in text_to_image")

    # Image -> text: the best-scoring caption decides.
    best_caption = s.masked_fill(~is_pair, float("-inf")).amax(dim=1, keepdim=True)
    txt_rank = ((s >= best_caption) & ~is_pair).sum(dim=1)
    # Text -> image: one right image per text.
    right_image = s.gather(0, owner.unsqueeze(0))
    img_rank = ((s >= right_image) & ~is_pair).sum(dim=0)

    out: dict[str, float] = {}
    for k in _RECALL_KS:
        out[f"txt_r{k}"] = (txt_rank < k).double().mean().item()
    for k in _RECALL_KS:
        out[f"img_r{k}"] = (img_rank < k).double().mean().item()
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def chance_recall(text_to_image: Sequence[int] | torch.Tensor, num_images: int) -> dict[str, float]:
    """The expected :func:`retrieval_metrics` of a ranking in random order (retrieval's text prior:
    a query alone says nothing about which candidate is right), same keys, each in [0, 1].

    Text -> image: one right image among ``num_images``, so R@k = min(k, I) / I. Image -> text:
    an image with c of the T texts is hit when any of them is in a random top k, with
    probability 1 - C(T - c, k) / C(T, k); R@k is its mean over images.
    """
    owner = [int(i) for i in torch.as_tensor(text_to_image).tolist()]
    num_texts = len(owner)
    if num_texts == 0 or num_images < 1:
        raise ValueError("chance_recall needs at least one image and one text")
    per_image = Counter(owner)
    if len(per_image) != num_images or min(per_image) < 0 or max(per_image) >= num_images:
        raise ValueError(f"text_to_image must give every one of the {num_images} images at least one text")
    out: dict[str, float] = {}
    for k in _RECALL_KS:
        hit = [1.0 - math.comb(num_texts - c, k) / math.comb(num_texts, k) if k <= num_texts else 1.0
               for c in per_image.values()]
        out[f"txt_r{k}"] = sum(hit) / num_images
    for k in _RECALL_KS:
        out[f"img_r{k}"] = min(k, num_images) / num_images
    out["r_mean"] = sum(out.values()) / len(out)
    return out
