from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import run_two_gloo_processes
from sklearn.metrics import adjusted_rand_score
from test_balance import unit, write_embeddings

from clipcid.cluster.kmeans import proportional_split
from clipcid.cluster.run import ClusterConfig, cluster, resolve_k
from clipcid.errors import ClipcidError


def blobs(n: int = 4000, k: int = 30, dim: int = 32, noise: float = 0.03, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(k, dim)))
    y = rng.integers(k, size=n)
    return unit(centres[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y


def labels_of(out: Path, parts: int = 3) -> np.ndarray:
    return np.concatenate([np.load(out / "labels" / f"labels_{i}.npy") for i in range(parts)])


def test_planted_clusters_recovered_at_least_as_well_as_faiss(tmp_path):
    x, y = blobs()
    emb = write_embeddings(tmp_path / "emb", x)
    stats = cluster(ClusterConfig(emb=str(emb), out=str(tmp_path / "cl"), k=30))
    ours = adjusted_rand_score(y, labels_of(tmp_path / "cl"))
    stored = unit(x.astype(np.float16).astype(np.float32))
    direct = []
    for seed in range(3):  # faiss.Kmeans called directly, random initialisation
        km = faiss.Kmeans(32, 30, niter=20, seed=seed, spherical=True)
        km.train(stored)
        direct.append(adjusted_rand_score(y, km.index.search(stored, 1)[1][:, 0]))
    assert ours >= max(direct) - 1e-9 and ours > 0.99
    assert stats["k"] == 30 and stats["assigned"] == 4000 and stats["empty_clusters"] == 0
    centroids = np.load(tmp_path / "cl" / "centroids.npy")
    assert centroids.shape == (30, 32) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    obj = stats["objective_per_iteration"]  # summed similarity, rising; faiss stops once it is stable
    assert 1 <= len(obj) <= 20 and all(b >= a - 1e-3 for a, b in zip(obj, obj[1:], strict=False))
    assert (tmp_path / "cl" / "cluster_sizes.png").is_file()


def test_same_seed_same_labels_and_resume(tmp_path):
    x, _ = blobs(n=1500, k=10)
    emb = write_embeddings(tmp_path / "emb", x)
    cluster(ClusterConfig(emb=str(emb), out=str(tmp_path / "a"), k=10, seed=3))
    cluster(ClusterConfig(emb=str(emb), out=str(tmp_path / "b"), k=10, seed=3))
    np.testing.assert_array_equal(labels_of(tmp_path / "a"), labels_of(tmp_path / "b"))
    # A run that died after part 0: part 0 is not recomputed, the result is the same.
    (tmp_path / "a" / "labels" / "labels_1.npy").unlink()
    (tmp_path / "a" / "labels" / "labels_2.npy").unlink()
    mtime = (tmp_path / "a" / "labels" / "labels_0.npy").stat().st_mtime_ns
    cluster(ClusterConfig(emb=str(emb), out=str(tmp_path / "a"), k=10, seed=3))
    assert (tmp_path / "a" / "labels" / "labels_0.npy").stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(labels_of(tmp_path / "a"), labels_of(tmp_path / "b"))


def test_dropped_and_invalid_rows_get_minus_one(tmp_path):
    x, _ = blobs(n=900, k=5)
    valid = np.ones(900, bool)
    valid[[5, 6]] = False
    emb = write_embeddings(tmp_path / "emb", x, valid=valid)
    keep = np.ones(900, bool)
    keep[[10, 400, 899]] = False
    (tmp_path / "bal" / "keep").mkdir(parents=True)
    for i, idx in enumerate(np.array_split(np.arange(900), 3)):
        np.save(tmp_path / "bal" / "keep" / f"keep_{i}.npy", keep[idx])
    stats = cluster(ClusterConfig(emb=str(emb), out=str(tmp_path / "cl"), k=5, balance=str(tmp_path / "bal")))
    labels = labels_of(tmp_path / "cl")
    assert (labels[[5, 6, 10, 400, 899]] == -1).all() and (np.delete(labels, [5, 6, 10, 400, 899]) >= 0).all()
    assert stats["unassigned"] == 5 and stats["assigned"] == 895
    # The corpus before balance: the removed rows assigned too (to their nearest centroid), in a file of
    # their own; the invalid rows stay -1 there.
    every = np.concatenate([np.load(tmp_path / "cl" / "corpus_labels" / f"labels_{i}.npy") for i in range(3)])
    assert (every[labels >= 0] == labels[labels >= 0]).all() and (every[[5, 6]] == -1).all()
    centroids = np.load(tmp_path / "cl" / "centroids.npy")
    stored = unit(x.astype(np.float16).astype(np.float32))
    assert (every[[10, 400, 899]] == (stored[[10, 400, 899]] @ centroids.T).argmax(1)).all()
    spread = stats["before_and_after_balance"]
    assert spread["before"]["rows"] == 898 and spread["after"]["rows"] == 895
    assert (tmp_path / "cl" / "cluster_balance.png").is_file()


def test_spread_of_cluster_sizes_known_answers():
    from clipcid.cluster.run import spread

    even, one = spread(np.array([5, 5, 5, 5])), spread(np.array([0, 0, 0, 4]))
    assert (
        even["gini"] == pytest.approx(0)
        and even["entropy_bits"] == pytest.approx(2)
        and even["normalized_entropy"] == 1
    )
    assert one["gini"] == pytest.approx(0.75) and one["entropy_bits"] == 0 and one["largest_share"] == 1
    assert spread(np.array([1, 3]))["gini"] == pytest.approx(0.25)


def test_two_level_mode_on_planted_data(tmp_path):
    x, y = blobs(n=6000, k=64, noise=0.02)
    emb = write_embeddings(tmp_path / "emb", x)
    stats = cluster(ClusterConfig(emb=str(emb), out=str(tmp_path / "cl"), k=64, two_level="on"))
    assert stats["two_level"] and np.load(tmp_path / "cl" / "centroids.npy").shape == (64, 32)
    assert np.load(tmp_path / "cl" / "coarse_centroids.npy").shape == (8, 32)
    assert adjusted_rand_score(y, labels_of(tmp_path / "cl")) > 0.9
    # Its 8 coarse cells, all probed (nprobe 8): every label is the exact nearest centroid, and the stats
    # say so. On structureless data, probing one cell of 8 misses some.
    assert stats["exact_agreement"] == {"rows": 6000, "nprobe": 8, "share": 1.0}
    noise = write_embeddings(tmp_path / "noise", blobs(n=3000, k=3000, noise=0.0)[0])
    one = cluster(ClusterConfig(emb=str(noise), out=str(tmp_path / "one"), k=64, two_level="on", assign_nprobe=1))
    assert 0.3 < one["exact_agreement"]["share"] < 0.99


def test_proportional_split():
    sizes = np.array([100, 1, 0, 50, 49])
    out = proportional_split(20, sizes)
    assert out.sum() == 20 and out[2] == 0 and out[1] == 1 and (out <= sizes).all()
    assert out[0] > out[3] >= out[4]


def test_auto_k_and_errors(tmp_path):
    assert resolve_k("auto", 225_000) == 1000 and resolve_k("auto", 10) == 1
    x, _ = blobs(n=300, k=3)
    emb = write_embeddings(tmp_path / "emb", x)
    with pytest.raises(ClipcidError, match="larger than the 300 kept rows"):
        cluster(ClusterConfig(emb=str(emb), out=str(tmp_path / "cl"), k=301))
    (tmp_path / "bal" / "keep").mkdir(parents=True)
    for i, n in enumerate([100, 100, 99]):
        np.save(tmp_path / "bal" / "keep" / f"keep_{i}.npy", np.ones(n, bool))
    with pytest.raises(ClipcidError, match="balance part 2 has 99 rows but embedding part 2 has 100"):
        cluster(ClusterConfig(emb=str(emb), out=str(tmp_path / "cl"), k=3, balance=str(tmp_path / "bal")))


def same_clustering(a: Path, b: Path) -> None:
    """Every rank trains on its share and the sums are all-reduced; they are integers (fixed point), so
    the order they are added in does not matter: the same clustering bit for bit."""
    assert (labels_of(a) == labels_of(b)).all()
    assert np.array_equal(np.load(a / "centroids.npy"), np.load(b / "centroids.npy"))
    # The stats are summed per part by the part's rank, then reduced: the same figures too.
    stats = [json.loads((x / "stats.json").read_text()) for x in (a, b)]
    for key in ("rows", "assigned", "cluster_size", "empty_clusters", "mean_similarity_to_centroid"):
        assert stats[0][key] == stats[1][key], key


@pytest.mark.parametrize("two_level", ["off", "on"])
def test_two_gloo_processes_equal_one(tmp_path, two_level):
    x, _ = blobs(n=1500, k=16)
    emb = write_embeddings(tmp_path / "emb", x)
    cluster(ClusterConfig(emb=str(emb), out=str(tmp_path / "single"), k=16, two_level=two_level))
    run_two_gloo_processes(
        [
            "-m",
            "clipcid",
            "cluster",
            "--emb",
            str(emb),
            "--out",
            str(tmp_path / "double"),
            "--k",
            "16",
            "--two-level",
            two_level,
            "--device",
            "cpu",
        ]  # fmt: skip
    )
    same_clustering(tmp_path / "single", tmp_path / "double")
    assert not (tmp_path / "double" / "training").exists()  # the scratch state goes once training is done


def _unit_rows(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_assignment_gives_faiss_ivf_labels_and_with_every_cell_probed_the_exact_nearest():
    import faiss

    from clipcid.cluster.run import Assigner

    rng = np.random.default_rng(0)
    d, k, cells = 48, 3000, 50
    centroids, x = _unit_rows(rng, k, d), _unit_rows(rng, 5000, d)
    coarse = centroids[rng.choice(k, cells, replace=False)].copy()
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(coarse)
    ivf = faiss.IndexIVFFlat(quantizer, d, cells, faiss.METRIC_INNER_PRODUCT)
    ivf.is_trained, ivf.nprobe = True, 6
    ivf.add(centroids)
    sims, ids = ivf.search(x, 1)
    labels, ours = Assigner(centroids, coarse, nprobe=6, memory_gb=0.001).assign(x)  # many small blocks
    np.testing.assert_array_equal(labels, ids[:, 0])
    np.testing.assert_allclose(ours, sims[:, 0], atol=1e-5)
    exact = (x @ centroids.T).argmax(axis=1)
    assert (labels != exact).any()  # nprobe 6 of 50 misses some: the test can tell the two apart
    np.testing.assert_array_equal(Assigner(centroids, coarse, nprobe=cells).assign(x)[0], exact)
    np.testing.assert_array_equal(Assigner(centroids, None, nprobe=1).assign(x)[0], exact)


def test_a_killed_training_resumes_from_its_last_finished_iteration(tmp_path, monkeypatch):
    import clipcid.cluster.artifact as artifact
    import clipcid.cluster.kmeans as kmeans

    x, _ = blobs(n=1200, k=8)
    emb = write_embeddings(tmp_path / "emb", x)
    cfg = ClusterConfig(emb=str(emb), out=str(tmp_path / "straight"), k=8, niter=10, init="random", plots=False)
    cluster(cfg)
    real = artifact.write_kmeans_state

    def crash_after_four(folder, stage, redo, iteration, centroids, objective):
        real(folder, stage, redo, iteration, centroids, objective)
        if iteration == 4:
            raise RuntimeError("killed")

    monkeypatch.setattr(artifact, "write_kmeans_state", crash_after_four)
    with pytest.raises(RuntimeError, match="killed"):
        cluster(replace(cfg, out=str(tmp_path / "killed")))
    monkeypatch.setattr(artifact, "write_kmeans_state", real)
    ran = []
    real_lloyd = kmeans.lloyd
    monkeypatch.setattr(
        kmeans, "lloyd", lambda env, x, c, a, its, *rest: ran.append(its) or real_lloyd(env, x, c, a, its, *rest)
    )
    stats = cluster(replace(cfg, out=str(tmp_path / "killed")))
    assert ran == [range(4, 10)]  # iterations 1-4 were not done again
    np.testing.assert_array_equal(
        np.load(tmp_path / "killed" / "centroids.npy"), np.load(tmp_path / "straight" / "centroids.npy")
    )
    np.testing.assert_array_equal(labels_of(tmp_path / "killed"), labels_of(tmp_path / "straight"))
    assert len(stats["objective_per_iteration"]) == 10


def test_a_sample_that_cannot_fit_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    from clipcid.embed.artifact import EmbeddingStore

    x, _ = blobs(n=900, k=3)
    emb = write_embeddings(tmp_path / "emb", x)
    monkeypatch.setattr(EmbeddingStore, "rows", lambda self, rows: pytest.fail("rows were read"))
    with pytest.raises(ClipcidError, match=r"more than --memory-gb 1e-05; raise --memory-gb, lower --max-points"):
        cluster(ClusterConfig(emb=str(emb), out=str(tmp_path / "cl"), k=3, memory_gb=1e-5))
    # The k x D copies count: a sample that fits beside small k is refused at large k.
    from clipcid.cluster.kmeans import check_memory
    from clipcid.stage import DistEnv

    one = DistEnv(0, 1, 0, "cpu")
    check_memory(1_000_000, 1280, 1000, one, 40)  # a 5.1 GB share, k = 1,000: fits
    with pytest.raises(ClipcidError, match=r"peak of 50\.7 GB per rank .* centroids' copies 25\.6 GB"):
        check_memory(1_000_000, 1280, 1_000_000, one, 40)


def test_the_sample_drawn_part_by_part_is_the_one_drawn_from_the_list_of_kept_rows():
    """No rank lists every kept row: the sample and each rank's share come from the mask part by part, and
    are exactly what choosing from the whole list (the earlier way) gave, for any number of ranks."""
    from clipcid.cluster.kmeans import KeptRows, draw_sample
    from clipcid.stage import DistEnv

    rng = np.random.default_rng(4)
    kept = rng.random(10_000) < 0.3
    offsets = np.array([0, 1_000, 1_000, 4_500, 10_000])  # an empty part too
    rows = np.flatnonzero(kept)
    for k, points in ((4, 100), (50, 1_000)):  # a subsample, then every kept row
        sample = draw_sample(KeptRows(kept, offsets), k, points, seed=7)
        limit = k * points
        expected = rows if len(rows) <= limit else np.sort(np.random.default_rng(7).choice(rows, limit, replace=False))
        assert len(sample) == len(expected) and np.array_equal(sample[np.arange(len(sample))], expected)
        for world in (1, 2, 3, 4):
            shares = [sample.share(DistEnv(r, world, r, "cpu")) for r in range(world)]
            assert all(np.array_equal(a, b) for a, b in zip(shares, np.array_split(expected, world), strict=True))
