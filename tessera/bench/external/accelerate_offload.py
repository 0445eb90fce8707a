"""HF Accelerate's disk offload on the workload of `tessera bench offload`; runs in its own environment
(`make accelerate-venv` builds .venv-accelerate/) and never imports tessera.

    python accelerate_offload.py WORKLOAD.json   ->   one JSON line on stdout

The workload: {"model", "dtype", "weight_memory" (bytes), "offload_folder", "runs": [{"batch", "prompt_len",
"output_len", "prompts"}], "threads"}. The model is loaded the way Accelerate's docs show for a model larger
than memory: `device_map="auto"` with `max_memory={"cpu": weight_memory}` and an `offload_folder`; what does
not fit is mapped to "disk" and brought in module by module by Accelerate's hooks. Greedy decoding is a plain
loop over the model's forward with its KV cache, so that prefill and decode are timed apart.

"page_cache" lists the ways each run goes: "cold" empties the page cache before every step (as root,
outside the timing): the model's disk pages then come from the disk each step, as they must when it is
larger than memory, which is the budget the two systems are compared at; "warm" leaves the cache alone,
so that after the first step Accelerate's memory-mapped reads hit the page cache, which then holds the
whole offloaded model beside the budget (reported for completeness, not as the same-budget figure).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    w = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(int(w.get("threads") or torch.get_num_threads()))
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[w["dtype"]]
    before = status("VmRSS")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(w["model"], dtype=dtype, device_map="auto",
                                                 max_memory={"cpu": int(w["weight_memory"])},
                                                 offload_folder=w["offload_folder"]).eval()
    load_s = time.perf_counter() - t0
    placement: dict[str, int] = {}
    for device in getattr(model, "hf_device_map", {}).values():
        placement[str(device)] = placement.get(str(device), 0) + 1
    def drop_cache() -> None:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")

    def forward(ids, past, cold: bool) -> tuple:
        """One step, timed alone; `cold` first empties the page cache (not timed)."""
        if cold:
            drop_cache()
        t = time.perf_counter()
        out = model(input_ids=ids, past_key_values=past, use_cache=True)
        return out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True), time.perf_counter() - t

    runs = []
    with torch.inference_mode():
        for r in w["runs"]:
            for cold in w["page_cache"]:
                ids = torch.tensor(r["prompts"], dtype=torch.long)
                past, nxt, prefill_s = forward(ids, None, cold == "cold")
                tokens, decode_s = [nxt], 0.0
                for _ in range(r["output_len"] - 1):
                    past, nxt, dt = forward(nxt, past, cold == "cold")
                    decode_s += dt
                    tokens.append(nxt)
                decode = r["batch"] * (r["output_len"] - 1) / decode_s
                runs.append({"batch": r["batch"], "output_len": r["output_len"], "page_cache": cold,
                             "prefill_s": round(prefill_s, 3), "decode_s": round(decode_s, 3),
                             "decode_tok_s": round(decode, 4), "first_tokens": torch.cat(tokens, 1)[0, :8].tolist()})
                print(json.dumps({"event": "run", **runs[-1]}), file=sys.stderr, flush=True)
    import accelerate
    import transformers

    print(json.dumps({"event": "done", "load_s": round(load_s, 2), "placement": placement, "runs": runs,
                      "peak_rss_growth_bytes": status("VmHWM") - before, "peak_rss_bytes": status("VmHWM"),
                      "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                   "accelerate": accelerate.__version__}}), flush=True)


if __name__ == "__main__":
    main()
