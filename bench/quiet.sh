#!/bin/bash
# Usage: bench/quiet.sh CMD...  — time something while the background bench runs stand still.
# Pauses (SIGSTOP) every `lostlm train bench/results/...` process (the runs `lostlm bench` and
# `lostlm scaling` start), runs CMD, and resumes them (SIGCONT) even when CMD fails or is
# interrupted. One quiet measurement at a time (flock on $QUIET_LOCK). Paused runs lose wall
# time only: their losses do not change. Keep CMD short (minutes).
exec 9>"${QUIET_LOCK:-/tmp/lostlm-quiet.lock}"
flock 9
pids=$(pgrep -f "lostlm train bench/results" | tr '\n' ' ')
resume() { [ -n "$pids" ] && kill -CONT $pids 2>/dev/null; }
trap resume EXIT INT TERM
[ -n "$pids" ] && kill -STOP $pids 2>/dev/null
"$@"
