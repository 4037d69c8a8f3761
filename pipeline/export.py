"""Export one node as a self-contained folder that the client a user deploys with opens at the node's quality.

DIR/
  config.json, *.safetensors, tokenizer files   the base weights in their deploy format, as stored (fp, NF4 via
                                                bitsandbytes, GPTQ via gptqmodel), copied in even when the node
                                                only references its parent's weights
  lora/                                         LoRA as a peft adapter dir (PeftModel.from_pretrained)
  hybrid/hybrid.json, hybrid/hybrid.safetensors bottleneck adapters and / or soft prompt, when not folded by a merge
  embed_int8.safetensors                        an int8 input embedding (quantize / ptq with embeddings: int8)
  hybrid_loader.py                              with hybrid/ or embed_int8: a standalone loader (torch + transformers,
                                                no import of this project)
  export.json                                   node, chain, state, format, loads_with, reported perplexity
  README.md                                     how to load it, exactly

The folder is written to a temp sibling and renamed into place when complete: an error leaves nothing.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import artifact
from .adapters import CONFIG as HYBRID_CONFIG
from .adapters import WEIGHTS as HYBRID_WEIGHTS
from .adapters import Hybrid
from .hybrid_loader import EMBED_INT8

LOADER = Path(__file__).with_name("hybrid_loader.py")
HYBRID_DIR = "hybrid"
PIP_NAMES = {"transformers": "transformers", "bitsandbytes": "bitsandbytes", "optimum": "optimum",
             "gptqmodel": "gptqmodel", "peft": "peft"}


class ExportError(ValueError):
    """An export that cannot be made: one line naming the node or folder and the fix."""


def check_dest(dest: Path) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest}: exists and is not an empty directory; give a new or empty DIR")


def _copy_lora(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    cfg_path = dst / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    # the path of the base on the machine that trained it means nothing elsewhere: the base is this export's root
    cfg["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _quality(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["The node has not been evaluated yet (`python -m pipeline run NODE` evaluates it)."]
    ev = metrics["eval"]
    return ["Perplexity the pipeline measured for this node, to check a deployment against (text tokenized without "
            f"special tokens, the first tokens cut into non-overlapping windows of {ev['seq_len']}, mean NLL per window; "
            "in the dtype the pipeline ran in, fp32 on CPU):", ""] + [
        f"- {c}: {p} over {ev['tokens'][c]:,} tokens; {ev['conventions'].get(c, '')}" for c, p in metrics["ppl"].items()]


def _snippet(name: str, man: dict, libs: list[str]) -> str:
    fmt = man["format"]
    gptq_note = ('# GPTQ on a GPU, offline: pass quantization_config=GPTQConfig(bits=4, backend="triton") to the load; '
                 "the default kernel choice may JIT-build one that downloads its sources")
    if artifact.HYBRID_LOADER in libs:
        return "\n".join([
            "import sys", "", f'sys.path.insert(0, "{name}")  # this folder: hybrid_loader.py lives in it',
            "import hybrid_loader", "", *([gptq_note] if fmt == "gptq" else []),
            f'model, tokenizer, hybrid = hybrid_loader.load("{name}", device="cpu")  # device="cuda" on a GPU',
            'ids = tokenizer("To be, or not", return_tensors="pt", add_special_tokens=False).input_ids',
            "logits = hybrid_loader.logits(model, hybrid, ids)  # the real tokens' logits (soft prompt dropped)",
            'print(hybrid_loader.generate(model, tokenizer, hybrid, "To be, or not", max_new_tokens=20))'])
    lines = ["import torch", *(["from peft import PeftModel"] if "peft" in libs else []),
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")']
    if fmt == "gptq":
        lines.append(gptq_note)
    if fmt in ("nf4", "gptq"):
        lines.append(f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype=torch.float32, '
                     'device_map={"": "cpu"})  # {"": "cuda"} on a GPU')
    else:
        lines.append(f'model = AutoModelForCausalLM.from_pretrained("{name}", dtype=torch.float32)  '
                     '# torch.bfloat16 on a GPU')
    if "peft" in libs:
        lines.append(f'model = PeftModel.from_pretrained(model, "{name}/lora")')
    lines += ['ids = tokenizer("To be, or not", return_tensors="pt", add_special_tokens=False).input_ids',
              "print(tokenizer.decode(model.generate(input_ids=ids, max_new_tokens=20, do_sample=False)[0]))"]
    return "\n".join(lines)


def readme(name: str, man: dict, libs: list[str], metrics: dict | None) -> str:
    versions = man.get("libraries", {})
    pins = " ".join(f"{PIP_NAMES[lib]}=={versions[lib]}" if versions.get(lib, "absent") != "absent" else PIP_NAMES[lib]
                    for lib in libs if lib in PIP_NAMES)
    fmt = {"hf": "full-precision safetensors", "nf4": "NF4 4-bit (bitsandbytes serialization)",
           "gptq": "4-bit GPTQ (the GPTQ checkpoint format transformers loads through gptqmodel)"}[man["format"]]
    parts = [f"# {man['node']}", "",
             f"Exported by `python -m pipeline export` from node `{man['node']}` (stages: "
             f"{' → '.join(man['chain']) or 'the base model'}), fingerprint `{man['fingerprint']}`.", "",
             f"- base weights: {fmt}, in this folder (config.json, *.safetensors, tokenizer files)"]
    if "peft" in libs:
        parts.append("- `lora/`: LoRA adapter in peft's format, over the weights above (not merged)")
    if man["state"].get("modules"):
        modules = " and ".join(man["state"]["modules"])
        parts.append(f"- `hybrid/`: {modules} (safetensors + json); transformers and peft have no such module, so "
                     "`hybrid_loader.py` (plain torch + transformers, documented inside) runs it: a model loaded "
                     "without it scores worse than the numbers below")
    if man["state"].get("int8_embedding"):
        parts.append(f"- `{EMBED_INT8}`: the input embedding (and the tied lm_head) as int8 codes with one float16 "
                     "scale per row, left out of the checkpoint above: no client loads an int8 embedding beside these "
                     "weights, so `hybrid_loader.py` puts it in; transformers alone initialises it at random")
    parts += ["", f"**Loads with:** {' + '.join(libs)}.", "", "```bash", f"pip install torch {pins}", "```", "",
              "```python", _snippet(name, man, libs), "```", ""]
    if "peft" in libs and artifact.HYBRID_LOADER not in libs:
        parts += ["`model.merge_and_unload()` folds the LoRA into the weights of an fp base (not into NF4 / GPTQ "
                  "weights: that re-rounds the LoRA delta away).", ""]
    parts += _quality(metrics) + [""]
    return "\n".join(parts)


def export(node_dir: Path, dest: Path, metrics: dict | None = None) -> dict:
    """Write the export of the artifact at `node_dir` to `dest` (absent or empty); returns export.json's content."""
    node_dir, dest = Path(node_dir), Path(dest)
    check_dest(dest)
    man = artifact.verify(node_dir)
    wdir = artifact.weights_dir(node_dir)
    if wdir != node_dir.resolve():
        artifact.verify(wdir)
    libs = artifact.loads_with(man)
    peft = artifact.peft_dir(node_dir)
    has_lora, has_hybrid, has_emb8 = (peft / "lora").is_dir(), Hybrid.exists(peft), (wdir / EMBED_INT8).is_file()
    if has_lora != ("peft" in libs) or (has_hybrid or has_emb8) != (artifact.HYBRID_LOADER in libs):
        raise ExportError(f"{node_dir}: its files (lora: {has_lora}, adapters/prompt: {has_hybrid}, int8 embedding: "
                          f"{has_emb8}) disagree with its "
                          f"manifest state {man['state']}; rebuild it: python -m pipeline run {man['node']} --force")
    info = {"node": man["node"], "chain": man["chain"], "fingerprint": man["fingerprint"], "format": man["format"],
            "state": man["state"], "loads_with": libs,
            **({"ppl": metrics["ppl"], "eval": {k: metrics["eval"][k] for k in ("seq_len", "tokens")}} if metrics else {})}
    with artifact.atomic_dir(dest) as tmp:
        for f in sorted(wdir.iterdir()):  # the base weights, config and tokenizer (never the manifest or peft/)
            if f.is_file() and f.name != artifact.MANIFEST:
                shutil.copy2(f, tmp / f.name)
        if has_lora:
            _copy_lora(peft / "lora", tmp / "lora")
        if has_hybrid:
            (tmp / HYBRID_DIR).mkdir()
            for name in (HYBRID_CONFIG, HYBRID_WEIGHTS):
                shutil.copy2(peft / name, tmp / HYBRID_DIR / name)
        if has_hybrid or has_emb8:
            shutil.copy2(LOADER, tmp / "hybrid_loader.py")
        artifact.write_json(tmp / "export.json", info)
        (tmp / "README.md").write_text(readme(dest.name, man, libs, metrics))
    return info
