# The two commands a newcomer needs. Both set up the machine first (scripts/setup.sh is idempotent).
.PHONY: test demo setup gpu-carry

test:
	scripts/test.sh

demo:
	scripts/demo.sh

setup:
	scripts/setup.sh

# Stripped binaries and fixtures for scripts/gpu-check.sh on a lent GPU machine.
gpu-carry:
	scripts/gpu-carry.sh
