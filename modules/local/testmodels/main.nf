/*
 * TESTMODELS: tiny random-initialised checkpoints in the official file formats, for the test
 * profile. They load through the real model code but cannot segment real images.
 */
process TESTMODELS {
    tag "test checkpoints"
    label 'process_single'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    output:
    path 'models', emit: models
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress models make-test ${args} --dest models

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    mkdir -p models

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
