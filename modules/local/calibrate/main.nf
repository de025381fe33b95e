/*
 * CALIBRATE: one tissue threshold pooled over the slides of one modality (--tissue_calibration),
 * so PLAN finds tissue the same way on all slides of a cohort instead of per-slide Otsu; a run
 * with brightfield and fluorescence slides calibrates each modality apart. The pixel sizes
 * (the samplesheet's, else --pixel_size_um; null: the slide's metadata) come comma-separated,
 * in the order of the slides.
 */
process CALIBRATE {
    tag "${modality}"
    label 'process_medium'
    container 'ghcr.io/bmseg/bmseg:0.1.0-cuda'

    input:
    tuple val(modality), val(pixel_sizes), path(slides, arity: '1..*', stageAs: 'slides??/*')

    output:
    tuple val(modality), path("${modality}.tissue_calibration.json"), emit: calibration
    path 'versions.yml', emit: versions

    script:
    def args = task.ext.args ?: ''
    """
    bmseg --no-progress calibrate-tissue ${slides} --pixel-sizes-um ${pixel_sizes} ${args} --out ${modality}.tissue_calibration.json

    bmseg versions --process ${task.process} > versions.yml
    """

    stub:
    """
    echo '{}' > ${modality}.tissue_calibration.json

    cat <<-END_VERSIONS > versions.yml
    "${task.process}":
        bmseg: stub
    END_VERSIONS
    """
}
