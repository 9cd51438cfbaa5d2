#!/usr/bin/env bash
# Creates a throwaway SoftHSM token for development, non-interactively, in a
# private directory.
#
#   CARDVAULT_HSM_SO_PIN=... CARDVAULT_HSM_PIN=... hsm/init-token.sh DIR LABEL
#
# PINs come from CARDVAULT_HSM_SO_PIN and CARDVAULT_HSM_PIN, or from the files
# named by CARDVAULT_HSM_SO_PIN_FILE and CARDVAULT_HSM_PIN_FILE (one trailing
# newline is dropped). Writes DIR/softhsm2.conf from hsm/softhsm2.conf.template
# and DIR/tokens/ (mode 0700), creates the token labelled LABEL unless one
# exists, and prints the SOFTHSM2_CONF line to use. Installs nothing.
#
# WARNING: softhsm2-util takes PINs only as command-line arguments, where other
# local users can read them (ps, /proc/PID/cmdline) while it runs. Use this
# script for throwaway development tokens only. The vault itself creates tokens
# through PKCS#11 (cardvault_hsm::softhsm::init_token), which keeps PINs off
# every command line.
set -euo pipefail

usage() {
    echo "usage: CARDVAULT_HSM_SO_PIN=... CARDVAULT_HSM_PIN=... $0 DIR LABEL" >&2
    exit 2
}
[[ $# -eq 2 ]] || usage
dir=$1
label=$2
[[ -n $label && ${#label} -le 32 ]] || { echo "LABEL must be 1 to 32 characters" >&2; exit 2; }

# read_pin NAME: value of $NAME, else contents of the file named by $NAME_FILE.
read_pin() {
    local var=$1 file_var="${1}_FILE" pin
    if [[ -n ${!var:-} ]]; then
        pin=${!var}
    elif [[ -n ${!file_var:-} ]]; then
        pin=$(cat -- "${!file_var}"; printf x)
        pin=${pin%x}
        pin=${pin%$'\n'}
        pin=${pin%$'\r'}
    else
        echo "set $var or $file_var" >&2
        exit 2
    fi
    [[ -n $pin ]] || { echo "$var is empty" >&2; exit 2; }
    printf '%s' "$pin"
}
so_pin=$(read_pin CARDVAULT_HSM_SO_PIN)
user_pin=$(read_pin CARDVAULT_HSM_PIN)

command -v softhsm2-util >/dev/null || { echo "softhsm2-util not found (install softhsm2)" >&2; exit 1; }

umask 077
script_dir=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
mkdir -p -- "$dir"
dir=$(cd -- "$dir" && pwd)
tokens=$dir/tokens
mkdir -p -- "$tokens"
chmod 700 -- "$tokens"
config=$(<"$script_dir/softhsm2.conf.template")
printf '%s\n' "${config//@TOKENDIR@/"$tokens"}" >"$dir/softhsm2.conf"
export SOFTHSM2_CONF=$dir/softhsm2.conf

if softhsm2-util --show-slots | awk -v want="$label" '
        /^[[:space:]]*Label:/ { sub(/^[[:space:]]*Label:[[:space:]]*/, ""); sub(/[[:space:]]+$/, ""); if ($0 == want) found = 1 }
        END { exit !found }'; then
    echo "token '$label' exists already" >&2
else
    softhsm2-util --init-token --free --label "$label" --so-pin "$so_pin" --pin "$user_pin" >/dev/null
    echo "created token '$label'" >&2
fi
echo "export SOFTHSM2_CONF=$SOFTHSM2_CONF"
