# Prints what the benchmark ran on, one key=value per line. POSIX sh for Android's mksh and for
# Linux; on a phone the values come from getprop and sysfs, on this machine from /proc and uname.

kv() { printf '%s=%s\n' "$1" "$2"; }
prop() { command -v getprop > /dev/null 2>&1 && getprop "$1" 2> /dev/null; }
first() { cat "$@" 2> /dev/null | head -n 1; }

kv model "$(prop ro.product.model)"
kv manufacturer "$(prop ro.product.manufacturer)"
kv soc "$(prop ro.soc.model)"
kv soc_manufacturer "$(prop ro.soc.manufacturer)"
kv board "$(prop ro.board.platform)"
kv hardware "$(prop ro.hardware)"
kv android "$(prop ro.build.version.release)"
kv abi "$(prop ro.product.cpu.abi)"
kv machine "$(uname -m)"
kv kernel "$(uname -r)"
kv hostname "$(uname -n)"
kv cpu_model "$(grep -m 1 -E '^(model name|Hardware|Processor)' /proc/cpuinfo 2> /dev/null | cut -d: -f2- | sed 's/^ *//')"
kv cores "$(grep -c '^processor' /proc/cpuinfo 2> /dev/null)"
kv cpus_online "$(first /sys/devices/system/cpu/online)"
# One max frequency per cluster (big.LITTLE phones have two or three).
kv cpu_max_khz "$(cat /sys/devices/system/cpu/cpu*/cpufreq/cpuinfo_max_freq 2> /dev/null | sort -un | tr '\n' ' ')"
kv governor "$(cat /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor 2> /dev/null | sort -u | tr '\n' ' ')"
kv mem_total_kb "$(grep -m 1 MemTotal /proc/meminfo 2> /dev/null | tr -s ' ' | cut -d' ' -f2)"
kv mem_available_kb "$(grep -m 1 MemAvailable /proc/meminfo 2> /dev/null | tr -s ' ' | cut -d' ' -f2)"
kv thermal_status "$(dumpsys thermalservice 2> /dev/null | grep -m 1 'Thermal Status' | cut -d: -f2 | tr -d ' ')"
hot=
for z in /sys/class/thermal/thermal_zone*/temp; do
  t=$(first "$z")
  case $t in '' | *[!0-9]*) continue ;; esac
  if [ -z "$hot" ] || [ "$t" -gt "$hot" ]; then hot=$t; fi
done
kv hottest_zone "$hot"
