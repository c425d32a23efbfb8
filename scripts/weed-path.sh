# Sourced: exports WEED, the path of the SeaweedFS binary installed by pip.
WEED="${WEED:-$(command -v weed 2>/dev/null || python3 -c 'import os,sys; print(os.path.join(sys.prefix, "bin", "weed"))')}"
export WEED
