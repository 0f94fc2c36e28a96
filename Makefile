# The two commands a newcomer needs. Both set up the machine first (scripts/setup.sh is idempotent).
.PHONY: test demo demo-tasks setup gpu-carry

test:
	scripts/test.sh

demo:
	scripts/demo.sh

# After `make demo`: the VQA, NLVR2 and RefCOCO+ example jobs from its pre-trained weights.
demo-tasks:
	scripts/demo-tasks.sh

setup:
	scripts/setup.sh

# Stripped binaries and fixtures for scripts/gpu-check.sh on a lent GPU machine.
gpu-carry:
	scripts/gpu-carry.sh
