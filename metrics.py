"""
Caption metrics, small and dependency-free: corpus BLEU-4 and CIDEr-D as the COCO caption evaluation defines
them (test_all.py checks them against pycocoevalcap when it is installed), and, for the shapes data, the
accuracy of each attribute a caption must get right.
"""
import itertools
import math
import re
from collections import Counter

import numpy as np


def tokenize(s):
    return re.sub(r"[^a-z0-9 ]+", " ", s.lower()).split()


def ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(hyps, refs):
    """Corpus BLEU-4; brevity penalty against the reference closest in length to each hypothesis."""
    match, total, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for h, rs in zip(hyps, refs):
        hw, rws = tokenize(h), [tokenize(r) for r in rs]
        hyp_len += len(hw)
        ref_len += min((abs(len(r) - len(hw)), len(r)) for r in rws)[1]
        for n in range(1, 5):
            hc = ngrams(hw, n)
            best = Counter()
            for r in rws:
                best |= ngrams(r, n)  # clip by the most any one reference has
            match[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            total[n - 1] += max(len(hw) - n + 1, 0)
    tiny, small = 1e-9, 1e-15
    logp = sum(math.log((m + tiny) / (t + small)) for m, t in zip(match, total)) / 4
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / max(hyp_len, small))
    return bp * math.exp(logp)


def cider_d(hyps, refs, sigma=6.0):
    """CIDEr-D: tf-idf weighted n-gram (1-4) cosine similarity, clipped, with a Gaussian length penalty, x10."""
    refs_w = [[tokenize(r) for r in rs] for rs in refs]
    df = Counter()
    for rs in refs_w:  # document frequency: in how many images' references an n-gram occurs
        df.update({g for r in rs for n in range(1, 5) for g in ngrams(r, n)})
    log_n = math.log(float(len(refs_w)))

    def vec(words):
        v = [dict() for _ in range(4)]
        for n in range(1, 5):
            for g, tf in ngrams(words, n).items():
                v[n - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(x * x for x in d.values())) for d in v]
        return v, norms, max(len(words) - 1, 0)  # coco-caption's length counts bigrams; kept for agreement

    scores = []
    for h, rs in zip(hyps, refs_w):
        vh, nh, lh = vec(tokenize(h))
        s = np.zeros(4)
        for r in rs:
            vr, nr, lr = vec(r)
            for n in range(4):
                val = sum(min(x, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, x in vh[n].items())
                if nh[n] and nr[n]:
                    val /= nh[n] * nr[n]
                s[n] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        scores.append(s.mean() / len(rs) * 10.0)
    return float(np.mean(scores))

# -----------------------------------------------------------------------------------------------------------
# shapes: does the caption name the right colours, shapes, count and spatial relation?


MENTION = re.compile(r"(small|large) (red|green|blue|yellow|purple|orange) (circle|square|triangle|diamond)")
REGIONS = ("in the middle", "on the left", "on the right", "at the top", "at the bottom")
REL_WORDS = {"to the left of": "left of", "to the right of": "right of", "above": "above", "below": "below"}


def match_mentions(ments, objs):
    """Which scene object each mention stands for: of the assignments of distinct objects to the first
    min(len) mentions, the one that agrees on most attributes. -> object index per mention (None past the last)."""
    k = min(len(ments), len(objs))
    best = max(itertools.permutations(range(len(objs)), k),
               key=lambda p: sum(m[j] == objs[i][j] for m, i in zip(ments, p) for j in range(3)))
    return list(best) + [None] * (len(ments) - k)


def judge(caption, scene):
    """{count, colour, shape, relation, exact}: each True/False for one generated caption."""
    from data import relation, region  # the same geometry the captions were written from
    objs = scene["objects"]
    ments = MENTION.findall(caption.lower())
    out = {"count": len(ments) == len(objs),
           "colour": sorted(m[1] for m in ments) == sorted(o[1] for o in objs),
           "shape": sorted(m[2] for m in ments) == sorted(o[2] for o in objs)}
    rel = False
    if len(ments) == len(objs):
        perm = match_mentions(ments, objs)
        if len(objs) == 1:
            rel = region(objs[0]) in caption.lower()
        elif len(objs) == 2:
            found = [w for w in REL_WORDS if w in caption.lower()]
            rel = bool(found) and REL_WORDS[found[0]] == relation(objs[perm[0]], objs[perm[1]])
        else:
            xs = [objs[i][3] for i in perm]
            rel = xs == sorted(xs) and "left to right" in caption.lower()
    out["relation"] = rel
    out["exact"] = all(out.values()) and all(m == o[:3] for m, o in zip(
        ments, [objs[i] for i in perm])) if len(ments) == len(objs) else False
    return out


def wrong_spans(caption, scene):
    """Character spans of the words in a caption that contradict the scene: a size, colour or shape the object
    it names does not have (every word of an object too many), a region, relation or left-to-right order that
    does not hold. What a caption leaves out has no word to mark."""
    from data import relation, region
    c, objs, spans = caption.lower(), scene["objects"], []
    found = list(MENTION.finditer(c))
    perm = match_mentions([m.groups() for m in found], objs)
    for m, i in zip(found, perm):
        spans += [m.span(j + 1) for j in range(3) if i is None or m.group(j + 1) != objs[i][j]]
    placed = [objs[i] for i in perm if i is not None]
    if len(objs) == 1:
        spans += [(k, k + len(r)) for r in REGIONS if r != region(objs[0]) for k in [c.find(r)] if k >= 0]
    elif len(objs) == 2 and len(placed) == 2:
        for words, rel in REL_WORDS.items():
            k = c.find(words)
            if k >= 0 and rel != relation(*placed):
                spans.append((k, k + len(words)))
                break
    elif len(objs) == 3 and len(placed) == 3 and [o[3] for o in placed] != sorted(o[3] for o in placed):
        k = c.find("left to right")
        spans += [(k, k + len("left to right"))] if k >= 0 else []
    return sorted(spans)


def shape_attribute_accuracy(hyps, scenes):
    results = [judge(h, s) for h, s in zip(hyps, scenes)]
    m = {f"attr_{k}": float(np.mean([r[k] for r in results])) for k in ("colour", "shape", "count", "relation")}
    m["attr_mean"] = float(np.mean(list(m.values())))
    m["attr_exact"] = float(np.mean([r["exact"] for r in results]))
    return m
