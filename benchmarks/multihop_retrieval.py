"""How hard the multi-hop world is for search: BM25 recall of the first-hop document.

For each held-out question of `multihop`, the whole question is the query (what an untrained
policy that copies the question would search); recall@k is the share of questions whose
first chain document is among BM25's top k. It prints the default world and the world with
each difficulty option turned off, so the effect of each is visible side by side:

    python benchmarks/multihop_retrieval.py                  # seeds 0-2, 200 questions each
    python benchmarks/multihop_retrieval.py --seeds 0 --n-eval 500

A second table searches each chain document by its exact title (what a demonstration does):
the share found at rank 1 and within top_k = 3.
"""

from __future__ import annotations

import argparse
import os
import tempfile

SETTINGS = {
    "default (twin_names 0.5, paraphrase)": {},
    "twin_names 0": {"twin_names": 0.0},
    "paraphrase off": {"paraphrase": False},
    "both off (the world before these options)": {"twin_names": 0.0, "paraphrase": False},
    "twin_names 1": {"twin_names": 1.0},
}


def first_hop_recall(env, ks=(1, 3, 5)) -> dict[int, float]:
    questions = list(env.eval_set())
    hits = []
    for corpus in dict.fromkeys(q["corpus"] for q in questions):
        group = [q for q in questions if q["corpus"] == corpus]
        found = env.backend(corpus).search_docs([q["question"] for q in group], max(ks))
        hits += [(q["chain"][0], [doc.id for doc, _ in h]) for q, h in zip(group, found)]
    return {k: sum(first in ranked[:k] for first, ranked in hits) / len(hits) for k in ks}


def title_recall(env, top_k: int = 3) -> tuple[float, float]:
    """Chain documents searched by their exact title: share at rank 1, share within top_k."""
    at1 = within = total = 0
    for q in env.eval_set():
        docs = env._documents(q["corpus"])
        titles = [docs[i].title for i in q["chain"]]
        for doc_id, found in zip(q["chain"], env.backend(q["corpus"]).search_docs(titles, top_k)):
            ranked = [doc.id for doc, _ in found]
            at1 += ranked[:1] == [doc_id]
            within += doc_id in ranked
            total += 1
    return at1 / total, within / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-eval", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("WAPO_CACHE", tempfile.mkdtemp())
    from wapo.envs.multihop import MultihopEnv

    print(f"BM25, whole question as query, first-hop document; mean over seeds {args.seeds}, "
          f"{args.n_eval} held-out questions each\n")
    print(f"| world | recall@1 | recall@3 | recall@5 | title search: rank 1 | title search: top 3 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, options in SETTINGS.items():
        recalls, titles = [], []
        for seed in args.seeds:
            env = MultihopEnv(seed=seed, n_train=10, n_eval=args.n_eval, **options)
            recalls.append(first_hop_recall(env))
            titles.append(title_recall(env))
        mean = {k: sum(r[k] for r in recalls) / len(recalls) for k in recalls[0]}
        t1 = sum(t[0] for t in titles) / len(titles)
        t3 = sum(t[1] for t in titles) / len(titles)
        print(f"| {name} | {mean[1]:.3f} | {mean[3]:.3f} | {mean[5]:.3f} | {t1:.3f} | {t3:.3f} |")


if __name__ == "__main__":
    main()
