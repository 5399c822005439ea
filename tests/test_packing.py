"""How many trials share a GPU, from hand-picked probe measurements."""
import torch

from tuneprod.tuning.packing import PackingTable, ProbePoint, probe, probe_batches, trials_per_gpu

GiB = 2**30
H200 = 141 * GiB


def curve(throughputs: dict[int, float], memory_per_image: int = 50 * 2**20) -> list[ProbePoint]:
    return [ProbePoint(b, ips, b * memory_per_image) for b, ips in throughputs.items()]


# efficientnet_b2 @256 on an H200 (bf16): a batch-32 trial leaves most of the GPU idle.
B2 = curve({32: 680, 64: 1300, 128: 2475, 256: 2900, 512: 3000})


def test_small_batches_that_leave_the_gpu_idle_are_packed():
    assert trials_per_gpu(B2, 32, H200, cpus_per_trial=2, cpus_per_gpu=16) == 4  # 256 gains only 1.17x on 128


def test_a_batch_that_already_fills_the_gpu_is_not_packed():
    assert trials_per_gpu(B2, 128, H200, cpus_per_trial=2, cpus_per_gpu=16) == 1


def test_memory_limits_packing():
    # 19 GiB per batch-32 trial (plus its CUDA context): 6 would fit in an H200's 90%, so 4 (not 8); 2 in 48 GiB.
    hungry = curve({32: 680, 64: 1300, 128: 2475, 256: 4900, 512: 9000}, memory_per_image=600 * 2**20)
    assert trials_per_gpu(hungry, 32, H200, cpus_per_trial=1, cpus_per_gpu=64) == 4
    assert trials_per_gpu(hungry, 32, 48 * GiB, cpus_per_trial=1, cpus_per_gpu=64) == 2
    assert trials_per_gpu(hungry, 32, 24 * GiB, cpus_per_trial=1, cpus_per_gpu=64) == 1


def test_cpus_limit_packing():
    assert trials_per_gpu(B2, 32, H200, cpus_per_trial=8, cpus_per_gpu=16) == 2


def test_a_larger_batch_that_ran_out_of_memory_stops_packing():
    assert trials_per_gpu(curve({32: 680, 64: 1300}), 32, H200, 1, 16) == 2  # 128 was not measured: OOM
    assert trials_per_gpu([], 32, H200, 1, 16) == 1


def test_never_more_than_eight():
    linear = curve({b: b * 20.0 for b in (8, 16, 32, 64, 128, 256)}, memory_per_image=2**20)
    assert trials_per_gpu(linear, 8, H200, 1, 64) == 8


def test_unprobed_batch_sizes_are_judged_by_the_next_larger_probed_one():
    table = PackingTable("H200", H200, {"efficientnet_b2": B2})
    assert table.trials_for("efficientnet_b2", 48, 2, 16) == table.trials_for("efficientnet_b2", 64, 2, 16) == 2
    assert table.trials_for("efficientnet_b2", 32, 2, 16) == 4
    assert table.trials_for("resnet50", 32, 2, 16) == 1  # not measured: a whole GPU
    assert table.trials_for("efficientnet_b2", 4096, 2, 16) == 1


def test_a_run_alone_is_planned_at_least_as_fast_as_the_probe_bounds_it():
    """4 packed batch-32 trials go no faster together than one batch of 128 (2475 img/s), so each at most 619 img/s;
    alone, batch 32 ran at 680: a member alone goes at least 680 / 619 = 1.1x a packed trial."""
    table = PackingTable("H200", H200, {"efficientnet_b2": B2})
    assert table.alone_speedup("efficientnet_b2", 32, 4) == 4 * 680 / 2475
    assert table.alone_speedup("efficientnet_b2", 64, 2) == 2 * 1300 / 2475
    assert table.alone_speedup("efficientnet_b2", 48, 2) == 2 * 1300 / 2475  # judged as batch 64, as packed
    assert table.alone_speedup("efficientnet_b2", 32, 1) == 1.0  # not packed
    assert table.alone_speedup("efficientnet_b2", 512, 2) == 1.0  # batch 1024 not probed: nothing to bound it by
    assert table.alone_speedup("resnet50", 32, 4) == 1.0
    superlinear = PackingTable("H200", H200, {"b": curve({32: 500, 64: 1200})})
    assert superlinear.alone_speedup("b", 32, 2) == 1.0  # never planned slower than packed


def test_probe_batches_double_up_to_eight_times_the_largest():
    assert probe_batches([32, 64, 128]) == [32, 64, 128, 256, 512, 1024]
    assert probe_batches([16]) == [16, 32, 64, 128]


def test_probe_measures_each_batch_size():
    points = probe("test_resnet", 32, 5, [2, 4], torch.device("cpu"), steps=1)
    assert [p.batch_size for p in points] == [2, 4] and all(p.images_per_s > 0 for p in points)
