#!/usr/bin/env bash
# Index a folder of videos and search it, as a table and as JSON.
#   bash examples/quickstart.sh [VIDEO_DIR]
# VIDEO_DIR defaults to ../shared/data/videos when present, else a few synthetic demo videos.
# The index goes to .demo/index (not your default index), so this leaves nothing else behind.
set -uo pipefail
cd "$(dirname "$0")/.."
videos="${1:-}"
if [ -z "$videos" ]; then
  if [ -d ../shared/data/videos ]; then videos=../shared/data/videos
  else videos=.demo/videos; python examples/make_demo_videos.py "$videos" >/dev/null; fi
fi
index=.demo/index
echo "== prvr ingest $videos (CLIP ViT-B-32 / openai)" >&2
prvr ingest "$videos" --index "$index"
rc=$?
if [ "$rc" -eq 8 ]; then
  # 8: CLIP weights not cached and no network. Go on with random weights so the pipeline can be seen
  # working end to end; the ranking is then meaningless. Pass --clip-pretrained FILE for real results.
  echo "== no CLIP weights here: smoke test with random weights (rankings are meaningless)" >&2
  index=.demo/index-random
  prvr ingest "$videos" --index "$index" --clip-pretrained none || exit $?
elif [ "$rc" -ne 0 ] && [ "$rc" -ne 3 ]; then
  exit "$rc"
fi
echo "== prvr search 'a woman applying eye makeup'" >&2
prvr search "a woman applying eye makeup" --index "$index" -k 5
echo "== the same as JSON" >&2
prvr search "a woman applying eye makeup" --index "$index" -k 3 --json
echo "== a contact sheet of the hits, and the best hit cut into a clip" >&2
prvr search "a woman applying eye makeup" --index "$index" -k 8 --preview .demo/sheet.png --paths-only >/dev/null
prvr export "a woman applying eye makeup" --index "$index" -k 1 -o .demo/clips
echo "== to look at the hits in a browser: prvr serve --index $index, then open http://127.0.0.1:8765/" >&2
