"""The `herd` CLI without a cluster: `herd bench` reaches every benchmark; expected errors are one
line on stderr with the documented exit status (no traceback), bugs a traceback; `--prompt-file`
and stdin give the tokens of `--prompt`; chat answers are printed on `herd> ` lines; the checks
`herd up` makes without Ray. (Against a running cluster: tests/cluster/test_serving.py and
tests/cluster/test_lifecycle.py.)"""

import io
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from cluster import errors
from cluster.cli import BENCHMARKS, PrefixedLines, main
from cluster.client import translate
from tests.cluster.conftest import free_port


def herd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_herd_bench_runs_each_benchmark(name):
    out = herd("bench", name, "--help")
    assert out.returncode == 0, out.stderr
    assert BENCHMARKS[name] in out.stdout  # the benchmark's own usage line


def test_herd_bench_rejects_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "nope"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_help_documents_the_exit_status():
    out = herd("--help")
    assert out.returncode == 0 and "exit status:" in out.stdout
    for code in (errors.EXIT_OK, errors.EXIT_FAILED, errors.EXIT_USAGE, errors.EXIT_UNREACHABLE, errors.EXIT_BUG):
        assert f"\n  {code} " in out.stdout


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"]])
def test_no_cluster_is_one_line_and_exit_3(command):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    out = herd(*command, "--address", address, stdin="hello\n")
    assert out.returncode == errors.EXIT_UNREACHABLE
    line = one_line_error(out)
    assert line == (f"herd {command[0]}: error: no herd cluster answers at {address}: start one with `herd up` "
                    "(or pass --address)")
    assert out.stdout == ""


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code, details, kind, fragment", [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: ...", errors.ClusterUnreachable,
     "no herd cluster answers at 1.2.3.4:9"),
    (grpc.StatusCode.NOT_FOUND, "Application metadata not set. Ping /ray.serve.RayServeAPIService/ListApplications "
     "for available applications.", errors.ClusterUnreachable, "runs no herd application"),
    (grpc.StatusCode.NOT_FOUND, "model 'x' is not served here", errors.RequestFailed, "model 'x' is not served here"),
    (grpc.StatusCode.UNAVAILABLE, "a part of the cluster is unavailable, retry: shard 1", errors.RequestFailed,
     "a part of the cluster is unavailable"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", errors.RequestFailed,
     "no answer from 1.2.3.4:9 within 7 s"),
    (grpc.StatusCode.INTERNAL, "", errors.RequestFailed, "gRPC status INTERNAL"),
    (grpc.StatusCode.UNAUTHENTICATED, "missing API key: send metadata", errors.RequestFailed,
     "missing API key: send metadata (1.2.3.4:9: pass --api-key or set HERD_API_KEY)"),
])
def test_grpc_errors_become_cli_errors(code, details, kind, fragment):
    err = translate(FakeRpcError(code, details), "1.2.3.4:9", 7)
    assert type(err) is kind and fragment in str(err)
    assert err.exit_code == (errors.EXIT_UNREACHABLE if kind is errors.ClusterUnreachable else errors.EXIT_FAILED)


def test_bad_input_is_one_line_and_exit_1():
    out = herd("generate", "--prompt-ids", "1,x", "--address", f"127.0.0.1:{free_port()}")
    assert out.returncode == errors.EXIT_FAILED
    assert one_line_error(out).startswith("herd generate: error: --prompt-ids must be comma-separated integers")


def test_usage_errors_exit_2():
    out = herd("generate", "--prompt", "a", "--prompt-ids", "1")
    assert out.returncode == errors.EXIT_USAGE and "not allowed with argument" in out.stderr
    out = herd("generate", "--offline", "--prompt", "a")
    assert out.returncode == errors.EXIT_USAGE and one_line_error(out).endswith("--offline needs --model DIR "
                                                                               "(the checkpoint to run)")


def test_a_bug_shows_its_traceback(monkeypatch, capsys):
    import cluster.cli

    def broken(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cluster.cli, "_status", broken)
    assert main(["status"]) == errors.EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err
    assert err.strip().splitlines()[-1].startswith("herd status: internal error (a bug in herd): RuntimeError: boom")


def test_verbose_adds_the_traceback_of_an_expected_error(capsys):
    assert main(["-v", "generate", "--prompt-ids", "1,x"]) == errors.EXIT_FAILED
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("herd generate: error: --prompt-ids")


# ---- --prompt-file ---------------------------------------------------------------------------

def test_unreadable_or_empty_prompt_file_is_one_line_and_exit_1(tmp_path):
    out = herd("generate", "--prompt-file", str(tmp_path / "missing.txt"))
    assert out.returncode == errors.EXIT_FAILED
    assert one_line_error(out) == f"herd generate: error: --prompt-file: cannot read {tmp_path}/missing.txt: " \
                                  "No such file or directory"
    out = herd("generate", "--prompt-file", "-", stdin="\n\n")
    assert out.returncode == errors.EXIT_FAILED and one_line_error(out).endswith("--prompt-file: stdin is empty")
    out = herd("generate", "--prompt", "a", "--prompt-file", "b")
    assert out.returncode == errors.EXIT_USAGE and "not allowed with argument" in out.stderr


def generate_offline(checkpoint, capsys, *prompt: str) -> dict:
    assert main(["generate", "--offline", "--model", str(checkpoint), *prompt, "--max-tokens", "6", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_prompt_file_and_stdin_equal_prompt_offline(checkpoint, capsys, monkeypatch, tmp_path):
    text = "Herd serves Llama 4.\nA second line, ünïcode too."
    want = generate_offline(checkpoint, capsys, "--prompt", text)
    (tmp_path / "prompt.txt").write_text(text + "\n", encoding="utf-8")
    assert generate_offline(checkpoint, capsys, "--prompt-file", str(tmp_path / "prompt.txt")) == want
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO((text + "\r\n").encode()), encoding="utf-8"))
    assert generate_offline(checkpoint, capsys, "--prompt-file", "-") == want


def test_fast_path_flags_offline_give_the_same_greedy_tokens(checkpoint, capsys):
    want = generate_offline(checkpoint, capsys, "--prompt", "Herd")
    fast = generate_offline(checkpoint, capsys, "--prompt", "Herd", "--expert-kernel", "grouped",
                            "--attention-backend", "reference")
    assert fast == want
    out = herd("generate", "--offline", "--model", str(checkpoint), "--prompt", "a", "--expert-kernel", "fast")
    assert out.returncode == errors.EXIT_USAGE and "invalid choice: 'fast'" in out.stderr


def test_attention_backend_flag_offline(checkpoint, capsys):
    want = generate_offline(checkpoint, capsys, "--prompt", "hi")
    # auto is the reference backend on the CPU
    assert generate_offline(checkpoint, capsys, "--prompt", "hi", "--attention-backend", "auto") == want
    out = herd("generate", "--offline", "--model", str(checkpoint), "--prompt", "hi", "--attention-backend", "flesh")
    assert out.returncode == errors.EXIT_USAGE and "invalid choice: 'flesh'" in out.stderr


# ---- herd chat -------------------------------------------------------------------------------

@pytest.mark.parametrize("chunks, printed", [
    (["Hello", " there"], "herd> Hello there\n"),
    (["one\ntw", "o\n", "\nfour"], "herd> one\nherd> two\nherd> \nherd> four\n"),
    (["ends with a newline\n"], "herd> ends with a newline\n"),
    ([], "herd> \n"),
    ([""], "herd> \n"),
])
def test_chat_answers_are_printed_on_herd_lines(capsys, chunks, printed):
    answer = PrefixedLines("herd> ")
    for c in chunks:
        answer.write(c)
    answer.end()
    assert capsys.readouterr().out == printed and answer.text == "".join(chunks)


SERVE_MESSAGE = """RouterService: A replica failed to start with exception. Retrying 2 more time(s). Error:
ray::ServeReplica:herd:RouterService.initialize_and_get_metadata() (pid=1, ip=10.0.0.1)
  File "replica.py", line 1928, in initialize
    raise RuntimeError(traceback.format_exc()) from None
RuntimeError: Traceback (most recent call last):
  File "model/checkpoint.py", line 190, in _read_state
    raise CheckpointError(f"{path}: tensor {name!r} is missing")
model.errors.CheckpointError: /ckpt: tensor 'norm.weight' is missing (expected shape [64])
"""


def test_a_failed_deployment_is_told_by_its_exception():
    from cluster.launcher import _exception_line

    expected = "CheckpointError: /ckpt: tensor 'norm.weight' is missing (expected shape [64])"
    assert _exception_line(SERVE_MESSAGE) == expected
    assert _exception_line("Deployment is unhealthy.\nmore") == "Deployment is unhealthy."


def test_resources_are_checked_before_ray():
    from cluster.launcher import ClusterError, check_resources, config_changes, resources_needed
    from deployments.config import HerdConfig

    cfg = HerdConfig.model_validate({"model": "/m", "router_service": {"num_replicas": 2, "num_gpus": 1},
                                     "experts": {"mode": "sharded", "num_shards": 4, "num_gpus_per_shard": 0.5,
                                                 "resources_per_shard": {"fast_nic": 1}}})
    assert resources_needed(cfg) == {"CPU": 1 * 2 + 1 + 0.5 + 4, "GPU": 2 + 2, "fast_nic": 4}
    check_resources(cfg, {"CPU": 8, "GPU": 4, "fast_nic": 4}, "here")
    with pytest.raises(ClusterError, match="needs 4 GPUs .* but here has 2"):
        check_resources(cfg, {"CPU": 8, "GPU": 2, "fast_nic": 4}, "here")
    with pytest.raises(ClusterError, match="fast_nic"):
        check_resources(cfg, {"CPU": 8, "GPU": 4}, "here")
    with pytest.raises(ClusterError, match="no GPU"):
        check_resources(HerdConfig(model="/m", device="cuda"), {"CPU": 8, "GPU": 0}, "here")
    assert config_changes({"model": "/a", "experts": {"mode": "colocated", "num_shards": 1}},
                          {"model": "/a", "experts": {"mode": "sharded", "num_shards": 1}}) == [
        "experts.mode: 'colocated' -> 'sharded'"]


# ---- herd keys -------------------------------------------------------------------------------------

def test_keys_add_list_revoke(tmp_path, monkeypatch, capsys):
    """On herd up's key store ($HERD_HOME/keys.json) unless --keys-file: add prints the key alone on
    stdout (once), list shows no secret, revoke removes it, and the store accepts exactly what it lists."""
    from deployments.auth import KeyStore

    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    assert main(["keys", "add", "--tenant", "acme"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    key_id = key.split("_")[1]
    assert key.startswith("herd_") and f"key {key_id} for tenant acme added to {tmp_path / 'keys.json'}" in out.err
    assert key not in (tmp_path / "keys.json").read_text()
    assert KeyStore(str(tmp_path / "keys.json")).lookup(key).tenant == "acme"
    assert main(["keys", "add", "--tenant", "ops", "--admin"]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["tenant"], k["admin"]) for k in listed] == [("acme", False), ("ops", True)]
    assert listed[0]["id"] == key_id and "sha256" not in listed[0]
    assert main(["keys", "revoke", key_id]) == 0
    assert f"revoked key {key_id} of tenant acme" in capsys.readouterr().out
    assert KeyStore(str(tmp_path / "keys.json")).lookup(key) is None
    assert main(["keys", "list"]) == 0
    assert key_id not in capsys.readouterr().out


def test_keys_errors_are_one_line(tmp_path):
    store = str(tmp_path / "keys.json")
    out = herd("keys", "revoke", "0123456789ab", "--keys-file", store)
    assert out.returncode == errors.EXIT_FAILED and "no key '0123456789ab'" in one_line_error(out)
    out = herd("keys", "add", "--tenant", "a b", "--keys-file", store)
    assert out.returncode == errors.EXIT_FAILED and "tenant name 'a b'" in one_line_error(out)
    (tmp_path / "keys.json").write_text("{}")
    out = herd("keys", "list", "--keys-file", store)
    assert out.returncode == errors.EXIT_FAILED and "is not a herd key store" in one_line_error(out)


def test_up_with_auth_makes_its_key_store_and_an_admin_key_once(tmp_path, monkeypatch):
    """What `herd up` deploys (cluster.launcher.with_auth): herd up's own key store and an admin key on
    first start, nothing new after; a key store the config names is checked; --no-auth makes no key."""
    from cluster.launcher import ClusterError, with_auth
    from deployments.auth import KeyStore
    from deployments.config import HerdConfig

    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    cfg, made = with_auth(HerdConfig(model="m"))
    assert cfg.auth.keys_file == str(tmp_path / "keys.json") and made is not None
    key, key_id = made
    assert (tmp_path / "admin-key").read_text().strip() == key
    assert oct((tmp_path / "admin-key").stat().st_mode & 0o777) == "0o600"
    principal = KeyStore(cfg.auth.keys_file).lookup(key)
    assert principal.admin and principal.key_id == key_id
    assert with_auth(HerdConfig(model="m")) == (cfg, None)  # the second start shows no key
    with pytest.raises(ClusterError, match="does not exist"):
        with_auth(HerdConfig(model="m", auth={"keys_file": str(tmp_path / "nope.json")}))
    off = HerdConfig(model="m", auth={"enabled": False})
    assert with_auth(off) == (off, None)


def test_up_no_auth_deploys_without_keys(tmp_path, monkeypatch, checkpoint):
    from cluster.launcher import State

    deployed = []
    monkeypatch.setenv("HERD_HOME", str(tmp_path))
    monkeypatch.setattr("cluster.launcher.up", lambda cfg, ports, replace_app: deployed.append(cfg) or State())
    assert main(["up", "--model", str(checkpoint), "--no-auth"]) == 0
    assert main(["up", "--model", str(checkpoint)]) == 0
    assert [c.auth.enabled for c in deployed] == [False, True]
