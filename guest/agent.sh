# pycrosvm test agent (busybox ash), sourced by /init; tests/guest_vm.py is its other end.
# Builtins only: every external command costs ~0.75 s of emulated fork+exec here.
#
# Protocol, one line each way per step, on one file descriptor:
#   host:  <id> <shell command>
#   guest: @@BEGIN <id> / O:<stdout line> / E:<stderr line> / @@END <id> <exit status>
# A last line without a newline is tagged O-: or E-:. The agent answers once it says
# @@READY. The id lets the host drop answers to commands it stopped waiting for.
# Text only: the shell's `read` drops NUL bytes (hash binary data in the guest instead).

# agent_emit TAG FILE: the lines of FILE prefixed with TAG.
agent_emit() {
    _l=
    while IFS= read -r _l; do echo "$1:$_l"; done < "$2"
    [ -z "$_l" ] || echo "$1-:$_l"
}

# agent_serve DIR: answer commands on fd 3 until it reaches end of file. A command's
# output goes to files in DIR first, so all of it is there when its status is.
agent_serve() {
    echo "@@READY" >&3
    while IFS= read -r _line <&3; do
        _id=${_line%% *}
        # fd 3 closed: a command (or a daemon it starts) must not read or write the channel.
        ( eval "${_line#* }" ) >"$1/.out" 2>"$1/.err" </dev/null 3>&-
        _rc=$?
        {
            echo "@@BEGIN $_id"
            agent_emit O "$1/.out"
            agent_emit E "$1/.err"
            echo "@@END $_id $_rc"
        } >&3
    done
}

# wait_for FILE TEXT [SECONDS]: print the first line of FILE that contains TEXT, reading
# FILE again every second until one does; after SECONDS (default 60) of guest uptime,
# say so on stderr and return 1. For devices that register after /init starts.
wait_for() {
    read -r _up _ < /proc/uptime
    _end=$(( ${_up%.*} + ${3:-60} ))
    while :; do
        if [ -r "$1" ]; then
            while IFS= read -r _l || [ -n "$_l" ]; do
                case "$_l" in *"$2"*) echo "$_l"; return 0 ;; esac
            done < "$1"
        fi
        read -r _up _ < /proc/uptime
        if [ "${_up%.*}" -ge "$_end" ]; then
            echo "wait_for: no line with '$2' in $1 after ${3:-60} s" >&2
            return 1
        fi
        sleep 1
    done
}
