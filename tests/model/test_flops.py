"""FLOP accounting used by the benchmark and MFU logging."""

import sys

from helpers import REPO, builder, tiny_config

from unigendet.data.packing import TextItem
from unigendet.ops.attention import dense_mask
from unigendet.profiling.flops import allowed_pairs, training_step_flops


def test_allowed_pairs_equals_dense_mask_count(mixed_samples):
    batch = builder(tiny_config()).build(mixed_samples)
    assert allowed_pairs(batch.layout) == int(dense_mask(batch.layout).sum())


def test_text_only_flops_match_the_6n_rule_plus_causal_attention():
    cfg = tiny_config()
    n = 10
    batch = builder(cfg).build([[TextItem(list(range(n - 2)))]])
    llm = cfg.llm
    d, hd = llm.hidden_size, llm.head_dim
    params = llm.num_hidden_layers * (2 * d * llm.num_attention_heads * hd + 2 * d * llm.num_key_value_heads * hd
                                      + 3 * d * llm.intermediate_size)
    attn = 4 * llm.num_attention_heads * hd * (n * (n + 1) // 2) * llm.num_hidden_layers
    assert training_step_flops(cfg, batch).total == 3 * (2 * n * params + attn)


def test_benchmark_script_runs(capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_step

    result = train_step.main(["--model", str(REPO / "configs/model/tiny.yaml"), "--pack-tokens", "150",
                              "--image-size", "32", "--steps", "1", "--warmup", "0", "--json"])
    assert result["tokens_per_s"] > 0 and 0 < result["mfu"] < 1
    assert '"mfu"' in capsys.readouterr().out
