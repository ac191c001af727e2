"""Shell commands as jobs: each job runs a command with subprocess.run and returns its output.

Run it with::

    python examples/shell_jobs.py                       # an embedded farm on this machine
    python examples/shell_jobs.py tcp://HEAD:5555       # or a running broker

The commands run on the workers' machines, in the worker's working directory and
environment, so they must exist there. A command that fails (non-zero exit status) does
not fail its job here: the job returns the exit status and both outputs, and the caller
decides. Pass ``check=True`` to subprocess.run to make it raise CalledProcessError instead.
"""

import subprocess
import sys


def run(command: list[str], timeout_s: float = 60) -> dict[str, object]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    return {"command": " ".join(command), "status": done.returncode,
            "stdout": done.stdout.strip(), "stderr": done.stderr.strip()}


def main() -> int:
    import zfarm

    commands = [
        ["uname", "-sr"],
        ["python3", "-c", "import sys; print(sys.version.split()[0])"],
        ["sh", "-c", "echo $((6 * 7))"],
        ["sh", "-c", "echo 'something went wrong' >&2; exit 3"],
        ["ls", "/no/such/folder"],
    ]
    address = sys.argv[1] if len(sys.argv) > 1 else None  # None: an embedded farm
    failed = 0
    with zfarm.Client(address) as client:
        for result in client.map(run, commands):
            if result["status"] == 0:
                print(f"ok      {result['command']}: {result['stdout']}")
            else:
                failed += 1
                print(f"exit {result['status']:<2} {result['command']}: {result['stderr']}")
    print(f"{len(commands) - failed} of {len(commands)} commands succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
