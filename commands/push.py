"""`lorafit push FOLDER org/name`: upload an adapter, merged or GGUF folder to the Hugging
Face Hub through huggingface_hub. `--dry-run` lists what would be sent and sends nothing."""

from __future__ import annotations

from pathlib import Path

from lorafit.core.errors import LorafitError

MARKERS = ("adapter_config.json", "config.json", "Modelfile")


def files_to_send(folder: str | Path) -> list[tuple[str, int]]:
    """(path relative to the folder, bytes) of every file that would be uploaded: hidden
    files and lorafit's staging leftovers stay home."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorafitError(f"{folder}: no such folder")
    if not any((folder / m).exists() for m in MARKERS) and not any(folder.glob("*.gguf")):
        raise LorafitError(f"{folder}: not an adapter, model or GGUF folder (no "
                           f"{', '.join(MARKERS)} or .gguf file)")
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and not any(part.startswith(".") or part.endswith(".tmp")
                                   for part in rel.parts):
            out.append((rel.as_posix(), p.stat().st_size))
    return out


def check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise LorafitError(f"{repo_id!r} is not a Hub repository id (expected org/name)")


def main(folder: str, repo_id: str, dry_run: bool = False, private: bool = False,
         revision: str | None = None, message: str | None = None) -> int:
    check_repo_id(repo_id)
    files = files_to_send(folder)
    total = sum(n for _, n in files)
    if dry_run:
        print(f"would upload {len(files)} files ({total:,} bytes) to "
              f"https://huggingface.co/{repo_id}" + (f" (revision {revision})" if revision
                                                     else ""))
        for name, n in files:
            print(f"  {name}  {n:,}")
        return 0
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=message or "Upload with lorafit push",
                                 allow_patterns=[name for name, _ in files])
    except HfHubHTTPError as e:
        raise LorafitError(f"upload to {repo_id} failed: {' '.join(str(e).split())[:200]}") \
            from None
    print(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
    return 0
