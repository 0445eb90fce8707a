"""Where a step's time goes: torch.profiler over a slice of the throughput workload, summarised by
operator family."""

from __future__ import annotations

from torch.profiler import ProfilerActivity, profile

_FAMILIES = {
    "gemm (linear/matmul)": ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm"),
    "attention": ("tessera::paged_decode_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math"),
    "kv gather/write": ("aten::index_select", "aten::index_copy_", "aten::index"),
    "elementwise/norm/rope": ("aten::mul", "aten::add", "aten::cat", "aten::rsqrt", "aten::pow", "aten::mean",
                              "aten::silu", "aten::sub", "aten::to", "aten::copy_", "aten::div"),
    "sampling": ("aten::argmax", "aten::exponential_", "aten::softmax", "aten::_softmax", "aten::sort"),
}


def profile_run(llm, prompts, out_lens, temperature: float, max_prompts: int = 16) -> dict:
    from tessera import SamplingParams

    params = [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=min(o, 64))
              for o in out_lens[:max_prompts]]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate(prompts[:max_prompts], params, use_tqdm=False)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    fam = {k: 0.0 for k in _FAMILIES}
    for e in events:
        for k, names in _FAMILIES.items():
            if e.key in names:
                fam[k] += e.self_cpu_time_total
    fam["other (python, scheduler, small ops)"] = total - sum(fam.values())
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "share_of_op_time": {k: round(v / total, 3) for k, v in fam.items()},
        "top_ops": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count} for e in top],
        "note": "torch.profiler self CPU time over the first prompts (outputs capped at 64 tokens)",
    }
