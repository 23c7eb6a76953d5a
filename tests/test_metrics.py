"""Downstream metrics against hand-computed values (CPU, no model)."""

import numpy as np
import pytest
import torch

from soho_core.tasks.metrics import (
    accuracy,
    build_answer_vocab,
    normalize_answer,
    retrieval_metrics,
    vqa_score,
    vqa_soft_targets,
)

# --- normalize_answer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        # case, whitespace, newlines and tabs
        ("Yes", "yes"),
        ("  Two\tdogs\n", "2 dogs"),
        ("red \n  car", "red car"),
        # punctuation without a neighbouring space becomes a space
        ("black-and-white", "black and white"),
        ("t-shirt", "t shirt"),
        ("red,blue", "red blue"),
        ("left/right", "left right"),
        # punctuation next to a space is deleted
        ("yes, it is", "yes it is"),
        ("ice-cream !", "ice cream"),
        # ... and the decision holds for every occurrence of that character
        ("ice-cream - yes", "icecream yes"),
        ("ice-cream\t-yes", "icecream yes"),  # a tab is a space for this rule
        ("x/-y z-w", "x y z w"),  # decided on the input: the space "/" leaves does not count
        # periods: deleted unless a digit follows
        ("2.5", "2.5"),
        ("2.5.", "2.5"),
        (".5", ".5"),
        ("5.", "5"),
        ("u.s.a.", "usa"),
        ("mr. smith", "mr smith"),
        # commas in numbers: a digit-comma-digit makes every punctuation character vanish
        ("1,000", "1000"),
        ("1,000 (approx)", "1000 approx"),
        ("10,000-20,000", "1000020000"),
        # number words up to ten, and "none"
        ("none", "0"),
        ("zero", "0"),
        ("one", "1"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("two dogs", "2 dogs"),
        ("someone", "someone"),
        # articles
        ("the dog", "dog"),
        ("A man", "man"),
        ("an apple", "apple"),
        ("theater", "theater"),
        ("a", ""),
        # contractions
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("whats that", "what's that"),
        ("youre", "you're"),
        ("Cant", "can't"),
        ("don't", "don't"),
        ("its", "its"),
        # untouched characters
        ("10:30", "10:30"),
        ("50%", "50%"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# --- vqa_score ----------------------------------------------------------------------------------


def _answers(matches: int, said: str = "cat", other: str = "dog") -> list[str]:
    """Ten human answers of which ``matches`` say ``said``."""
    return [said] * matches + [other] * (10 - matches)


# matches -> (simple, official), by hand:
#   simple = min(m/3, 1); official: m annotators see m-1 matches, 10-m see m.
#   m=1: (1*0 + 9*1/3)/10 = 0.3        m=2: (2*1/3 + 8*2/3)/10 = 0.6
#   m=3: (3*2/3 + 7*1)/10 = 0.9        m=4: (4*1 + 6*1)/10 = 1
HAND = {
    0: (0.0, 0.0), 1: (1 / 3, 0.3), 2: (2 / 3, 0.6), 3: (1.0, 0.9), 4: (1.0, 1.0), 7: (1.0, 1.0)
}


@pytest.mark.parametrize("m", sorted(HAND))
def test_vqa_score_one_question(m):
    simple, official = HAND[m]
    assert vqa_score(["cat"], [_answers(m)]) == pytest.approx(simple)
    assert vqa_score(["cat"], [_answers(m)], official=True) == pytest.approx(official)


def test_vqa_score_averages_over_questions():
    preds = ["cat"] * 5
    answers = [_answers(m) for m in (0, 1, 2, 3, 4)]
    assert vqa_score(preds, answers) == pytest.approx((0 + 1 / 3 + 2 / 3 + 1 + 1) / 5)
    assert vqa_score(preds, answers, official=True) == pytest.approx((0 + 0.3 + 0.6 + 0.9 + 1) / 5)


def test_vqa_score_normalises_both_sides():
    # "Two." -> "2"; "two" and "2" are the same answer; "The 2" too.
    answers = ["2", "two", "The 2", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_score(["Two."], [answers]) == pytest.approx(1.0)
    assert vqa_score(["2"], [answers], official=True) == pytest.approx(0.9)
    assert vqa_score(["Don't know"], [["dont know"]]) == pytest.approx(1 / 3)


def test_vqa_score_official_with_fewer_answers():
    # 4 answers, 2 matches: the 2 matchers see 1 (1/3), the 2 others see 2 (2/3) -> 0.5.
    assert vqa_score(["a cat"], [["cat", "cat", "dog", "dog"]], official=True) == pytest.approx(0.5)


def test_vqa_score_rejects_bad_input():
    with pytest.raises(ValueError, match="2 entries"):
        vqa_score(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="answers\\[0\\]"):
        vqa_score(["a"], [[]])
    with pytest.raises(ValueError):
        vqa_score([], [])


# --- vqa_soft_targets and build_answer_vocab ----------------------------------------------------


def test_vqa_soft_targets():
    vocab = {"yes": 0, "no": 1, "2": 2}
    answers = ["yes", "yes", "yes", "Yes.", "no", "no", "two", "purple", "purple", "purple"]
    # yes: 4 -> 1; no: 2 -> 2/3; "two" -> "2": 1 -> 1/3; purple is out of vocabulary.
    targets = vqa_soft_targets(answers, vocab)
    assert targets.keys() == {0, 1, 2}
    assert targets[0] == pytest.approx(1.0)
    assert targets[1] == pytest.approx(2 / 3)
    assert targets[2] == pytest.approx(1 / 3)
    assert vqa_soft_targets(["purple"] * 10, vocab) == {}
    assert vqa_soft_targets([], vocab) == {}


def test_build_answer_vocab_order_and_ties():
    lists = [["yes", "yes", "no"], ["no", "Yes", "cat"], ["dog", "bird", "Cat."], ["the"]]
    # Every answer counts: yes 3, cat 2, no 2, bird 1, dog 1 ("the" -> "" is dropped).
    assert build_answer_vocab(lists, 4) == ["yes", "cat", "no", "bird"]
    assert build_answer_vocab(lists, 100) == ["yes", "cat", "no", "bird", "dog"]
    assert build_answer_vocab(reversed(lists), 4) == ["yes", "cat", "no", "bird"]
    assert build_answer_vocab(iter(lists), 1) == ["yes"]
    with pytest.raises(ValueError, match="size"):
        build_answer_vocab(lists, 0)


def test_vocab_feeds_soft_targets():
    vocab = build_answer_vocab([["Two", "2", "three"]], 2)
    assert vocab == ["2", "3"]
    index = {a: i for i, a in enumerate(vocab)}
    assert vqa_soft_targets(["two", "2", "three"], index) == pytest.approx({0: 2 / 3, 1: 1 / 3})


# --- accuracy ---------------------------------------------------------------------------------


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == pytest.approx(0.5)
    assert accuracy(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])) == pytest.approx(1.0)
    assert accuracy(np.array([2, 2, 0]), [1, 2, 0]) == pytest.approx(2 / 3)
    assert accuracy([True, False, True], [1, 0, 0]) == pytest.approx(2 / 3)
    assert accuracy(torch.tensor([[1, 0], [0, 0]]), torch.zeros(2, 2, dtype=torch.long)) == 0.75
    with pytest.raises(ValueError, match="shape"):
        accuracy([1, 0], [1, 0, 1])
    with pytest.raises(TypeError, match="argmax"):
        accuracy(torch.randn(3, 2), [0, 1, 1])


# --- retrieval_metrics --------------------------------------------------------------------------

# 3 images x 6 texts; texts 0,1 -> image 0, texts 2,3 -> image 1, texts 4,5 -> image 2.
OWNER = torch.tensor([0, 0, 1, 1, 2, 2])
SCORES = torch.tensor(
    [
        # t0   t1   t2   t3   t4   t5
        [0.2, 0.9, 0.5, 0.1, 0.3, 0.0],  # image 0: best caption t1 (its 2nd), rank 0
        [0.8, 0.1, 0.6, 0.2, 0.7, 0.0],  # image 1: best caption t2 0.6; t0, t4 above -> rank 2
        [0.4, 0.3, 0.2, 0.2, 0.4, 0.1],  # image 2: best caption t4 0.4 ties wrong t0 -> rank 1
    ]
)
# Text -> image, column by column (rank = wrong images scoring >= the right one):
#   t0 [0.2 | 0.8 0.4] -> 2    t1 [0.9 | 0.1 0.3] -> 0    t2 [0.6 | 0.5 0.2] -> 0
#   t3 [0.2 | 0.1 0.2] -> 1 (tie with image 2)             t4 [0.4 | 0.3 0.7] -> 1
#   t5 [0.1 | 0.0 0.0] -> 0
EXPECTED = {
    "txt_r1": 1 / 3, "txt_r5": 1.0, "txt_r10": 1.0,
    "img_r1": 3 / 6, "img_r5": 1.0, "img_r10": 1.0,
}


def test_retrieval_hand_computed():
    got = retrieval_metrics(SCORES, OWNER)
    assert set(got) == set(EXPECTED) | {"r_mean"}
    for key, value in EXPECTED.items():
        assert got[key] == pytest.approx(value), key
    assert got["r_mean"] == pytest.approx(29 / 36)
    assert got["r_mean"] == pytest.approx(sum(got[k] for k in EXPECTED) / 6)


def test_retrieval_hits_on_second_caption_only():
    # Image 0's first caption is ranked last; its second is first: still a hit at 1.
    scores = torch.tensor([[0.0, 1.0, 0.5], [0.9, 0.2, 0.6]])
    got = retrieval_metrics(scores, torch.tensor([0, 0, 1]))
    # image 0: best caption t1, wrong t2 0.5 below -> hit. image 1: t2 0.6 < t0 0.9 -> rank 1.
    assert got["txt_r1"] == pytest.approx(0.5)


def test_retrieval_ties_count_against():
    # Breaking the one tie in the model's favour turns two misses into hits.
    untied = SCORES.clone()
    untied[2, 4] = 0.45  # image 2's caption t4 now beats t0 -> txt hit; t4 keeps rank 1
    untied[1, 3] = 0.25  # text t3's image 1 now beats image 2 -> img hit
    got = retrieval_metrics(untied, OWNER)
    assert got["txt_r1"] == pytest.approx(2 / 3)
    assert got["img_r1"] == pytest.approx(4 / 6)
    # All scores equal: every wrong candidate ranks above (4 wrong texts, 2 wrong images).
    flat = retrieval_metrics(torch.zeros(3, 6), OWNER)
    assert flat["txt_r1"] == 0.0 and flat["txt_r5"] == 1.0
    assert flat["img_r1"] == 0.0 and flat["img_r5"] == 1.0
    # Ties among an image's own captions are free.
    own_scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    own = retrieval_metrics(own_scores, torch.tensor([0, 0, 1]))
    assert own["txt_r1"] == 1.0 and own["img_r1"] == 1.0


def test_retrieval_ranks_across_k():
    # 12 images, 12 texts, text i belongs to image i. scores[i, j] = 1 if j < i, 0 on the
    # diagonal, -1 above it: image i has i wrong texts above its caption (ranks 0..11) and
    # text j has 11 - j wrong images above its image (ranks 11..0).
    n = 12
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    scores = (j < i).float() - (j > i).float()
    got = retrieval_metrics(scores.numpy(), np.arange(n))
    for side in ("txt", "img"):
        assert got[f"{side}_r1"] == pytest.approx(1 / 12)
        assert got[f"{side}_r5"] == pytest.approx(5 / 12)
        assert got[f"{side}_r10"] == pytest.approx(10 / 12)
    assert got["r_mean"] == pytest.approx(16 / 36)


def test_retrieval_matches_a_loop_reference():
    gen = torch.Generator().manual_seed(0)
    num_images, per_image = 7, 3
    owner = torch.arange(num_images).repeat_interleave(per_image)[torch.randperm(21, generator=gen)]
    scores = torch.randint(0, 4, (num_images, 21), generator=gen)  # small ints: many ties
    txt_rank = [
        sum(int(scores[i, t] >= max(scores[i, owner == i])) for t in range(21) if owner[t] != i)
        for i in range(num_images)
    ]
    img_rank = [
        sum(int(scores[i, t] >= scores[owner[t], t]) for i in range(num_images) if i != owner[t])
        for t in range(21)
    ]
    got = retrieval_metrics(scores, owner)
    for k in (1, 5, 10):
        assert got[f"txt_r{k}"] == pytest.approx(np.mean([r < k for r in txt_rank]))
        assert got[f"img_r{k}"] == pytest.approx(np.mean([r < k for r in img_rank]))


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="no text"):
        retrieval_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(torch.zeros(2, 2), torch.tensor([0, 2]))
