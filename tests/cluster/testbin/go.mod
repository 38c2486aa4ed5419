// The programs inside the test cluster's own images, as one static binary
// that acts by the name it is run as (tests/cluster/build.sh builds it).
module fn-image-resolver.test/cluster/testbin

go 1.24.0
