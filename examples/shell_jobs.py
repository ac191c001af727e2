"""Shell commands as jobs: ``client.run`` runs a command on a worker, as ``subprocess.run`` would there.

Run it with::

    python examples/shell_jobs.py                       # an embedded farm on this machine
    python examples/shell_jobs.py tcp://HEAD:5555       # or a running broker

The commands run on the workers' machines, in the worker's working directory and
environment, so they must exist there. Each future gives a ``zfarm.CommandResult``
(return code, stdout and stderr as text, run time, worker and host). With ``check=False`` a
command that fails does not raise: the caller looks at its return code. With the default
``check=True`` it raises ``zfarm.CommandFailed``; a program that does not exist raises
``zfarm.CommandNotFound`` either way. From the shell, ``zfarm submit --array`` does the same
for whole arrays of commands (docs/batch.md).
"""

import sys


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
        futures = [client.run(command, check=False) for command in commands]
        for future in futures:
            result = future.result()
            line = " ".join(result.args)
            if result.returncode == 0:
                print(f"ok      {line}: {result.stdout.strip()}  ({result.host}, {result.run_s:.3f} s)")
            else:
                failed += 1
                print(f"exit {result.returncode:<2} {line}: {result.stderr.strip()}")
        try:
            client.run(["no-such-program"]).result()
        except zfarm.CommandNotFound as missing:
            print(f"as expected: {missing}")
    print(f"{len(commands) - failed} of {len(commands)} commands succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
