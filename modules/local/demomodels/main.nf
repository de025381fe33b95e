/*
 * DEMOMODELS: the demo models folder for the test profile, made here with no download: a small
 * Cellpose-SAM trained on synthetic slides' planted HSPCs (bmseg models make-demo, docs/models.md),
 * with random-initialised SAM2 and ResNet-50 checkpoints beside it.
 */
process DEMOMODELS {
    tag "demo models"
    label 'process_single'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    output:
    path 'models', emit: models
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress models make-demo ${args} --dest models

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
