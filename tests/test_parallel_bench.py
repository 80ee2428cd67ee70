"""``adacache-fx parallel-bench``: its counts come from the captured graphs of real ranks."""

from __future__ import annotations

from adacache_fx.tools import parallel_bench


def test_parallel_bench_counts_steps_and_collectives_on_two_ranks():
    layers, steps = 1, 6
    ranks = parallel_bench.run_ranks(world=2, layers=layers, steps=steps, repeats=1, timeout_s=240)
    for result in ranks:
        # every step computes: 6; rate 3 after step 2: steps 1, 2, then 5 and 6 (steps N-1 and N always compute)
        assert [result[name]["computed"] for name in parallel_bench.CODEBOOKS] == [6, 4]
        for name in parallel_bench.CODEBOOKS:
            # added by adacache_fx: one all-reduce of the metric parts per step; the model's own output
            # all-gather runs every step too; its 4 all-to-alls per self-attention only on compute steps
            assert result[name]["every_step"] == {"all_reduce": 1, "all_gather_into_tensor": 1}
            assert result[name]["compute_step"] == {"all_to_all_single": 4 * layers}
            assert result[name]["median_s"] > 0
    table = parallel_bench.format_table(ranks[0], ranks, 2)
    assert "| every step computes (`{1e+09: 1}`) | 6 / 6, 6 |" in table
