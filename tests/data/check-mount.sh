#!/bin/bash
# The logic of Fluid's sidecar post-start check (pkg/application/inject/fuse/
# poststart/check_fuse_default.go), restated for tests: wait until a
# mountinfo line matches both the parent of targetPath and the file system
# type (unquoted basic regex greps over the whole line), then until
# <parent>/*/<subPath> exists. Uses only bash, cat, grep, expr, sleep, test.
ConditionPathIsMountPoint="$1"
MountType="$2"
SubPath="$3"

count=0
while ! cat /proc/self/mountinfo | grep $ConditionPathIsMountPoint | grep $MountType > /dev/null
do
    sleep 1
    count=`expr $count + 1`
    if test $count -eq 29
    then
        echo "timed out waiting for $ConditionPathIsMountPoint to be mounted"
        exit 1
    fi
done

count=0
while ! test -e $ConditionPathIsMountPoint/*/$SubPath
do
    sleep 1
    count=`expr $count + 1`
    if test $count -eq 29
    then
        echo "timed out waiting for $ConditionPathIsMountPoint/*/$SubPath"
        exit 1
    fi
done
echo "mounted"
