# Runs a command and samples its memory from /proc/PID/status until it exits.
# POSIX sh: runs under Android's mksh and under dash/bash on Linux, so the phone and this
# machine are measured by the same code. Only shell builtins in the sampling loop (plus
# sleep), so sampling does not steal a core from the process it measures.
#
# usage: sh rss_sampler.sh OUT_DIR INTERVAL_S COMMAND [ARGS...]
# writes OUT_DIR/stdout, OUT_DIR/stderr (the command's), OUT_DIR/pid, OUT_DIR/rss ("VmHWM_kB VmRSS_kB
# RssAnon_kB RssFile_kB" per sample: anonymous memory, and pages of mapped files such as the .pte), OUT_DIR/temp (hottest thermal zone before and after, raw sysfs units), OUT_DIR/load
# (1-minute load average before: other work competing for the cores) and OUT_DIR/rc (its exit status, 128+N when killed by signal N); exits with that status.

out=$1
interval=$2
shift 2
mkdir -p "$out" || exit 97

hottest() {
  m=
  for z in /sys/class/thermal/thermal_zone*/temp; do
    [ -r "$z" ] || continue
    t=
    read -r t < "$z" 2>/dev/null
    case $t in '' | *[!0-9]*) continue ;; esac
    if [ -z "$m" ] || [ "$t" -gt "$m" ]; then m=$t; fi
  done
  echo "$m"
}

hottest > "$out/temp"
{ read -r load1 rest < /proc/loadavg && echo "$load1" > "$out/load"; } 2> /dev/null
"$@" > "$out/stdout" 2> "$out/stderr" &
pid=$!
echo "$pid" > "$out/pid"  # for the harness to stop it after a timeout or Ctrl-C
: > "$out/rss"
while kill -0 "$pid" 2> /dev/null; do
  hwm=
  rss=
  anon=
  file=
  {
    while read -r key val unit; do
      case $key in
        VmHWM:) hwm=$val ;;
        VmRSS:) rss=$val ;;
        RssAnon:) anon=$val ;;
        RssFile:) file=$val ;;
      esac
    done < "/proc/$pid/status"
  } 2> /dev/null
  # A zombie has no Vm* lines; VmHWM is a high-water mark, so the last live sample holds the peak.
  [ -n "$hwm" ] && echo "$hwm $rss $anon $file" >> "$out/rss"
  sleep "$interval"
done
wait "$pid"
rc=$?
hottest >> "$out/temp"
echo "$rc" > "$out/rc"
exit "$rc"
