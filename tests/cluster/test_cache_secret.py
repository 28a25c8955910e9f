"""`herd up`'s shared-cache secret: made once in HERD_HOME (mode 0600), kept, and passed to the
replicas by its path only."""

import stat

from cluster.launcher import cache_secret_file, with_cache_secret
from deployments.config import RedisConfig
from deployments.shared_cache.setup import read_secret


def test_the_secret_is_made_once_private_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path / "home"))
    path = cache_secret_file()
    assert path == tmp_path / "home" / "cache-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text().strip()
    assert len(text) == 64 and int(text, 16)
    assert cache_secret_file() == path and path.read_text().strip() == text  # the next herd up: same secret
    assert [p.name for p in path.parent.iterdir()] == ["cache-secret"]  # no temporary file left


def test_herd_up_fills_in_the_secret_file_unless_one_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    filled = with_cache_secret(RedisConfig(url="redis://127.0.0.1:6379"))
    assert filled.secret_file == str(tmp_path / "cache-secret")
    secret = (tmp_path / "cache-secret").read_text()
    assert secret.strip() not in filled.model_dump_json()  # only the path travels in the config
    read_secret(filled)  # what a replica reads
    named = RedisConfig(url="redis://127.0.0.1:6379", secret_env="MY_SECRET")
    assert with_cache_secret(named) is named


def test_deleting_the_secret_file_rotates_it(tmp_path, monkeypatch):
    """What docs/OPERATIONS.md says: delete the file, `herd up --replace` the same config."""
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    deployed = with_cache_secret(RedisConfig(url="redis://127.0.0.1:6379"))
    old = (tmp_path / "cache-secret").read_text()
    (tmp_path / "cache-secret").unlink()
    again = with_cache_secret(deployed)
    assert again == deployed and (tmp_path / "cache-secret").read_text() != old
    own = RedisConfig(url="redis://127.0.0.1:6379", secret_file=str(tmp_path / "mine"))
    assert with_cache_secret(own) is own and not (tmp_path / "mine").exists()  # never made for the user


def test_a_relative_herd_home_still_gives_the_replicas_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HERD_HOME", "home")
    filled = with_cache_secret(RedisConfig(url="redis://127.0.0.1:6379"))
    assert filled.secret_file == str(tmp_path / "home" / "cache-secret")
    assert with_cache_secret(filled) == filled
