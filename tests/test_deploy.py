"""Deployment files checked without a docker engine: configs load, compose is well-formed
for what it must do (GPUs, read-only models, secrets, health, profiles), Dockerfiles lint."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

# The compose-spec keys this project may use (a subset of the Compose Specification).
TOP_LEVEL = {"name", "services", "secrets", "volumes", "networks", "configs"}
SERVICE_KEYS = {
    "build", "image", "restart", "shm_size", "ipc", "ulimits", "volumes", "env_file",
    "environment", "secrets", "stop_grace_period", "healthcheck", "command", "entrypoint",
    "ports", "deploy", "profiles", "depends_on", "network_mode",
}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates(path):
    config = load_config(path)
    assert config.engine.num_speculative_tokens >= 1
    assert config.alignment.rule in {"kad_dual", "kad_primal", "nudging", "base"}


def test_paper_pairs_use_the_paper_defaults():
    for name in ("olmo2-1b-13b.yaml", "qwen3-1.7b-14b.yaml"):
        config = load_config(REPO / "configs" / name)
        assert config.alignment.rule == "kad_dual" and config.alignment.lam == 0.4
        assert config.engine.num_speculative_tokens == 5 and config.engine.dtype == "bfloat16"


def test_config_flows_into_vllm_engine_args():
    """What the config says reaches vLLM: TP/PP, the draft model as speculator with its full
    probabilities, and an explicit KV-cache size on CPU (no free-memory fraction check).
    (The arguments only: vLLM's validation of them needs the models, tests/test_preflight.py.)"""
    from server.engine.vllm_engine import engine_args_for_length as engine_args

    config = load_config(REPO / "configs" / "tiny-cpu.yaml")
    args = engine_args(config, 1036)
    assert args.kv_cache_memory_bytes == int(config.engine.cpu_kv_cache_gib * 2**30)
    assert args.speculative_config["method"] == "draft_model"
    assert args.speculative_config["draft_sample_method"] == "probabilistic"
    assert args.speculative_config["num_speculative_tokens"] == (
        config.engine.num_speculative_tokens)
    gpu = load_config(REPO / "configs" / "qwen3-1.7b-14b.yaml")
    gpu_args = engine_args(gpu, 8204)
    assert gpu_args.kv_cache_memory_bytes is None
    assert gpu_args.tensor_parallel_size == gpu.engine.tensor_parallel_size
    assert gpu_args.gpu_memory_utilization == gpu.engine.gpu_memory_utilization


@pytest.mark.parametrize(("text", "message"), [
    ("models: [1, 2]", "models"),
    ("engine: {}", "models: Field required"),
    ("models: {target: a, draft: b}\nengine: {gamma: 3}", "engine.gamma"),
    ("models: {target: a, draft: b}\nalignment: {rule: nope}", "unknown rule"),
    ("models: {target: a, draft: b}\nalignment: {rule: kad_dual, lam: 4}", "must lie in"),
    ("models: {target: a, draft: b}\nengine: {tensor_parallel_size: 0}", "tensor_parallel_size"),
    ("- just\n- a list", "must be a YAML mapping"),
    ("models: {target: a, draft: b", "not valid YAML"),
])
def test_bad_configs_fail_with_clear_messages(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value) and "bad.yaml" in str(error.value)


def test_missing_config_file_and_cli_exit_code(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    result = subprocess.run([sys.executable, "-m", "server", "--config", str(tmp_path / "x.yaml")],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "cannot read config" in result.stderr


def _compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("name", ["compose.yaml", "ray/compose.two-node.yaml"])
def test_compose_files_are_well_formed(name):
    compose = _compose(REPO / "docker" / name)
    assert {k for k in compose if not k.startswith("x-")} <= TOP_LEVEL
    for service_name, service in compose["services"].items():
        assert set(service) <= SERVICE_KEYS, (service_name, set(service) - SERVICE_KEYS)
        assert "image" in service or "build" in service
        for secret in service.get("secrets", []):
            assert secret in compose.get("secrets", {}), secret
        for volume in service.get("volumes", []):
            if "/models" in volume:
                assert volume.endswith(":ro"), "models are mounted read-only"
        command = service.get("command", [])
        if "--config" in command:
            assert (REPO / command[command.index("--config") + 1]).exists()
        gpus = (service.get("deploy", {}).get("resources", {}).get("reservations", {})
                .get("devices", []))
        for device in gpus:
            assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
            assert "count" in device
        if gpus:
            assert service.get("shm_size"), "NCCL needs a large /dev/shm"


def test_compose_gpu_services_and_monitoring():
    compose = _compose(REPO / "docker" / "compose.yaml")
    services = compose["services"]
    for name in ("olmo2", "qwen3"):
        service = services[name]
        assert service["restart"] == "unless-stopped"
        assert "/health" in " ".join(service["healthcheck"]["test"])
        assert "--tensor-parallel-size" in service["command"]
        assert service["ports"] and "8000" in service["ports"][0]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    assert services["cpu-demo"]["profiles"] == ["cpu"]
    scrape = yaml.safe_load((REPO / "docker/prometheus/prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    servers = {name for name, service in services.items()
               if service.get("image", "").startswith("kad-serve:")}
    assert {t.split(":")[0] for t in targets} == servers == {"olmo2", "qwen3", "cpu-demo"}
    assert scrape["scrape_configs"][0]["metrics_path"] == "/metrics"
    env = (REPO / "docker/.env.example").read_text()
    assert "KAD_TP_SIZE" in env and "KAD_MODELS_DIR" in env


def _hadolint() -> str:
    found = Path(sys.executable).parent / "hadolint"
    return str(found) if found.exists() else (shutil.which("hadolint") or "hadolint")


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    result = subprocess.run(
        [_hadolint(), "--config", str(REPO / ".hadolint.yaml"), str(REPO / "docker" / dockerfile)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (REPO / "docker" / dockerfile).read_text()
    assert "HEALTHCHECK" in text and "/health" in text
    assert 'ENTRYPOINT ["kad-serve"]' in text and "USER 10001" in text


def _default(value) -> str:
    """A compose value with ``${VAR:-default}`` replaced by its default."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))


def _argv(service: dict) -> list[str]:
    """The container's command line: entrypoint then command, a ``sh -c`` script split."""
    argv = list(service.get("entrypoint", [])) + list(service.get("command", []))
    if argv[:2] == ["sh", "-c"]:
        return shlex.split(argv[2].replace("&&", " && "))
    return argv


def test_two_node_compose_runs_the_server_beside_the_ray_head_and_a_worker_apart():
    """The structure a Ray head + worker deployment needs, not just the strings: the server
    runs in the head's container (vLLM's driver joins through the local raylet), the worker
    is not started with the head, ports agree, host networking everywhere (Ray, NCCL and
    the hook's TCP statistics reach the head node's address), no stats environment variable
    (the address travels in vLLM's config), and the config spans exactly these GPUs."""
    compose = _compose(REPO / "docker" / "ray" / "compose.two-node.yaml")
    services = compose["services"]
    for name, service in services.items():
        assert service.get("network_mode") == "host", name
        assert "ports" not in service, f"{name}: ports do not apply with host networking"
        for key in service.get("environment", {}):
            assert "STATS" not in key.upper(), f"{name}: stats address in the environment"
        assert any(v.endswith("/models:ro") for v in service["volumes"]), name
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["driver"] == "nvidia", name

    heads = {n: _argv(s) for n, s in services.items() if "--head" in _argv(s)}
    assert len(heads) == 1, heads
    (head_name, head_argv), = heads.items()
    head = services[head_name]
    assert head_argv[:3] == ["ray", "start", "--head"] and "profiles" not in head
    port = next(a.split("=", 1)[1] for a in head_argv if a.startswith("--port="))
    # Then the server, in the same container, as its main process (gets SIGTERM, drains).
    assert "&&" in head_argv, "the server must run in the Ray head's container"
    assert head_argv[head_argv.index("&&") + 1:][:2] == ["exec", "kad-serve"]
    server_argv = head_argv[head_argv.index("&&") + 3:]
    config_path = REPO / server_argv[server_argv.index("--config") + 1]
    assert config_path.exists(), config_path
    assert head["environment"]["RAY_ADDRESS"] == f"127.0.0.1:{port}"
    assert "healthcheck" not in head  # the image's GET :8000/health checks this server

    workers = {n: s for n, s in services.items() if n != head_name}
    assert len(workers) == 1
    (worker,) = workers.values()
    argv = _argv(worker)
    assert argv[:2] == ["ray", "start"] and "--block" in argv and "kad-serve" not in argv
    address = next(a.split("=", 1)[1] for a in argv if a.startswith("--address="))
    host, _, worker_port = address.rpartition(":")
    assert worker_port == port, "the worker joins the head's port"
    assert _default(host) not in {"127.0.0.1", "localhost", ""}, \
        "a worker node must be given the head's address, not default to itself"
    assert worker.get("profiles"), "a plain `up` on the head node must not start a worker"
    check = " ".join(worker["healthcheck"]["test"])
    assert "8000" not in check and "ray" in check, "the image's check is for the server"

    config = load_config(config_path)
    engine = config.engine
    assert engine.distributed_executor_backend == "ray"
    assert engine.pipeline_parallel_size == 2, "one pipeline stage per node"
    for service in services.values():
        count = service["deploy"]["resources"]["reservations"]["devices"][0]["count"]
        assert int(_default(count)) == engine.tensor_parallel_size, "GPUs per node"
    assert config.server.host == "0.0.0.0"
    assert config.models.target.startswith("/models/")
    assert config.models.draft.startswith("/models/")


def test_requires_python_admits_the_gpu_images_python():
    """pip checks Requires-Python even with --no-deps: the GPU image's build stops unless
    the project admits the Python of vLLM's release image, read from the Dockerfile."""
    import tomllib

    from packaging.specifiers import SpecifierSet

    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    found = re.search(r"^ARG PYTHON_VERSION=(\d+\.\d+)$", dockerfile, flags=re.MULTILINE)
    assert found, "docker/Dockerfile must name its base image's Python (ARG PYTHON_VERSION)"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    admitted = SpecifierSet(project["requires-python"])
    assert f"{found.group(1)}.0" in admitted
    assert f"{sys.version_info.major}.{sys.version_info.minor}.0" in admitted
    assert "check_pinned_internals" not in dockerfile  # imports the GPU runner: at start


# --- compose: no collisions, caches, monitoring ----------------------------------------------
COMPOSE_FILES = ["compose.yaml", "ray/compose.two-node.yaml"]
# The Compose Specification's JSON schema (compose-spec/compose-spec, Apache-2.0, with its
# LICENSE and SOURCE beside it). It is reference data kept outside this repository, in the
# shared data directory next to the checkout, or where KAD_COMPOSE_SCHEMA points.
COMPOSE_SCHEMA = Path(os.environ.get(
    "KAD_COMPOSE_SCHEMA", REPO.parent / "shared/data/compose-spec/compose-spec.json"))


def _gpus(service: dict) -> list[dict]:
    return (service.get("deploy", {}).get("resources", {}).get("reservations", {})
            .get("devices", []))


def _interpolated(value):
    """The compose document as compose reads it with no .env: every ``${VAR:-default}``
    its default, a string (the schema admits strings wherever compose interpolates)."""
    if isinstance(value, dict):
        return {key: _interpolated(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolated(item) for item in value]
    return _default(value) if isinstance(value, str) else value


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_validate_against_the_compose_specification(name):
    import jsonschema

    if not COMPOSE_SCHEMA.exists():
        pytest.skip(f"the Compose Specification schema is not at {COMPOSE_SCHEMA} "
                    "(reference data outside the repository; set KAD_COMPOSE_SCHEMA)")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    document = _interpolated(_compose(REPO / "docker" / name))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(document), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)
    # The check can fail: a misspelt key is refused.
    broken = json.loads(json.dumps(document))
    next(iter(broken["services"].values()))["restart_policy"] = "always"
    assert not jsonschema.Draft7Validator(schema).is_valid(broken)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_a_plain_up_starts_nothing_that_competes_for_a_gpu(name):
    """Docker gives ``count: N`` as devices 0..N-1 to every service: two GPU services
    started together share GPUs. Each GPU service is in a profile of its own (a plain `up`
    starts none), except a file's single GPU service; no profile holds two."""
    services = _compose(REPO / "docker" / name)["services"]
    gpu_services = {n: s for n, s in services.items() if _gpus(s)}
    unprofiled = [n for n, s in gpu_services.items() if not s.get("profiles")]
    by_profile: dict[str, list[str]] = {}
    for service_name, service in gpu_services.items():
        for profile in service.get("profiles", []):
            by_profile.setdefault(profile, []).append(service_name)
    if name == "compose.yaml":
        assert unprofiled == [], "a plain `docker compose up` would start these on GPU 0"
        assert all(len(members) == 1 for members in by_profile.values()), by_profile
    else:  # one node of the two-node deployment: the head, or (profile) the worker
        assert len(unprofiled) <= 1 and all(len(m) == 1 for m in by_profile.values())


def test_gpu_services_keep_vllms_cache_and_results_on_named_volumes():
    compose = _compose(REPO / "docker" / "compose.yaml")
    declared = set(compose.get("volumes", {}))
    for service_name in ("olmo2", "qwen3", "cpu-demo"):
        service = compose["services"][service_name]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts.get("/cache") in declared and mounts.get("/results") in declared
        assert service["environment"]["VLLM_CACHE_ROOT"].startswith("/cache/")
        if _gpus(service):
            assert "kad_api_key" in service["secrets"]
            assert "--api-key-file" in service["command"]
            assert any(v.endswith(":/models:ro") for v in service["volumes"])
            assert service["healthcheck"]["test"]
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        text = (REPO / "docker" / dockerfile).read_text()
        # a fresh named volume takes its mount point's owner: the server's user must own it
        assert re.search(r"mkdir -p /cache/vllm.*/results && chown -R kad /cache /results", text)
        assert "VLLM_CACHE_ROOT=/cache/vllm" in text


def test_the_readmes_compose_commands_start_exactly_one_pair():
    compose = _compose(REPO / "docker" / "compose.yaml")
    services = compose["services"]
    text = (REPO / "docs/deployment.md").read_text() + (REPO / "README.md").read_text()
    commands = re.findall(r"docker compose -f docker/compose\.yaml[^\n`]*\bup\b[^\n`]*", text)
    assert commands
    for command in commands:
        words = command.split("#")[0].split()
        profiles = {words[i + 1] for i, word in enumerate(words) if word == "--profile"}
        named = [w for w in words[words.index("up") + 1:] if not w.startswith("-")]
        started = set(named) or {n for n, s in services.items()
                                 if set(s.get("profiles", [])) & profiles
                                 or not s.get("profiles")}
        gpu = [n for n in started if _gpus(services[n])]
        assert len(gpu) <= 1, (command, gpu)


def test_grafana_is_provisioned_with_the_prometheus_datasource_and_the_dashboard():
    compose = _compose(REPO / "docker" / "compose.yaml")
    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provisioning = REPO / "docker" / mounts["/etc/grafana/provisioning"]
    dashboards = REPO / "docker" / mounts["/var/lib/grafana/dashboards"]
    source = yaml.safe_load((provisioning / "datasources/prometheus.yaml").read_text())
    datasource = source["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards/kad-serve.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((dashboards / "kad-serve.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
    assert "grafana_admin_password" in grafana["secrets"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"].startswith("/run/secrets/")


# What an operator must see (issue list); each a substring of some panel's queries.
DASHBOARD_MUST_SHOW = {
    "tokens per second": "rate(kad_generation_tokens_total",
    "requests running": "vllm:num_requests_running", "requests waiting": "vllm:num_requests_waiting",
    "TTFT percentiles": "histogram_quantile(0.95, sum by (le) (rate(kad_time_to_first_token",
    "inter-token latency": "histogram_quantile(0.95, sum by (le) (rate(vllm:inter_token_latency",
    "acceptance by rule": "sum by (rule) (rate(kad_accepted_tokens_total",
    "deferred mass by rule": "sum by (rule) (rate(kad_deferred_mass_total",
    "inexact tokens": "kad_inexact_tokens_total", "degraded tokens": "kad_degraded_tokens_total",
    "KV-cache use": "vllm:kv_cache_usage_perc", "preemptions": "vllm:num_preemptions_total",
}


def test_the_dashboard_shows_what_an_operator_needs_and_every_query_evaluates():
    from bench.dashboard import DASHBOARD, Query

    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for what, fragment in DASHBOARD_MUST_SHOW.items():
        assert any(fragment in query for query in queries), what
    for query in queries:  # within the renderer's PromQL subset: no silent gap
        Query(query).evaluate({})


def test_rendered_panels_compute_what_prometheus_would():
    """A counter rising 10 per second reads 10/s, a histogram's p50 and p95 interpolate
    within buckets, a ratio divides rule by rule."""
    from bench.dashboard import Query

    times = [0.0, 5.0, 10.0, 15.0]
    counter = {(("rule", "kad_dual 0.4"),): [(t, 10.0 * t) for t in times],
               (("rule", "base"),): [(t, 4.0 * t) for t in times]}
    drafted = {labels: [(t, 2 * v) for t, v in points] for labels, points in counter.items()}
    buckets = {(("endpoint", "/v1/completions"), ("le", le)): [(t, c * t) for t in times]
               for le, c in (("0.1", 0.0), ("0.5", 5.0), ("1.0", 9.0), ("+Inf", 10.0))}
    samples = {"kad_generation_tokens_total": counter, "kad_accepted_tokens_total": counter,
               "kad_drafted_tokens_total": drafted,
               "kad_time_to_first_token_seconds_bucket": buckets}
    rate = Query('sum by (rule) (rate(kad_generation_tokens_total{instance=~"$instance"}[1m]))'
                 ).evaluate(samples)
    assert rate[(("rule", "kad_dual 0.4"),)][-1][1] == pytest.approx(10.0)
    assert rate[(("rule", "base"),)][-1][1] == pytest.approx(4.0)
    total = Query("sum(rate(kad_generation_tokens_total[1m]))").evaluate(samples)
    assert total[()][-1][1] == pytest.approx(14.0)
    ratio = Query("sum by (rule) (rate(kad_accepted_tokens_total[5m])) / "
                  "sum by (rule) (rate(kad_drafted_tokens_total[5m]))").evaluate(samples)
    assert len(ratio) == 2 and all(v[-1][1] == pytest.approx(0.5) for v in ratio.values())
    # cumulative rates 0 / 5 / 9 / 10 at le 0.1 / 0.5 / 1.0 / +Inf: interpolated within
    # the bucket holding the rank; a rank in +Inf reads the highest finite bound
    for q, expected in ((0.3, 0.1 + 0.4 * 3 / 5), (0.7, 0.5 + 0.5 * 2 / 4), (0.95, 1.0)):
        value = Query(f"histogram_quantile({q}, sum by (le) "
                      "(rate(kad_time_to_first_token_seconds_bucket[5m])))").evaluate(samples)
        assert value[()][-1][1] == pytest.approx(expected)
    with pytest.raises(ValueError, match="subset"):
        Query("avg_over_time(kad_requests_running[5m])").evaluate(samples)


def _compose_cli() -> list[str] | None:
    """``docker compose`` (the plugin) or ``docker-compose``, when this machine has one."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 check=False, timeout=30).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_docker_compose_config_accepts_each_file(name, tmp_path):
    """Compose's own parser and interpolation, where a docker CLI with compose exists."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI on this machine (the schema test covers the files)")
    env = {**os.environ, "KAD_API_KEY_FILE": str(tmp_path / "key"),
           "KAD_GRAFANA_PASSWORD_FILE": str(tmp_path / "password")}
    (tmp_path / "key").write_text("k")
    (tmp_path / "password").write_text("p")
    result = subprocess.run([*cli, "-f", str(REPO / "docker" / name), "--profile", "*",
                             "config", "--quiet"], capture_output=True, text=True,
                            env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
